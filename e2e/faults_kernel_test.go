package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/redirect"
)

// Faults (issue 14, items 4 and 5): kernel tables at their limit, and a
// kernel without a feature.

// fillSocks fills the pinned ms_socks with sockets of the test process
// (connected TCP pairs on the host's loopback, never written to), so that
// no socket of a pod fits; the sockets close with the test.
func fillSocks(t *testing.T, pin string) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", redirect.CaptureMapMsSocks), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for i := range int(m.MaxEntries()) {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		key := redirect.CaptureMsSockKey{Netns: ^uint64(0), LocalPort: uint16(i)}
		if err := m.Update(&key, uint64(f.Fd()), ebpf.UpdateNoExist); err != nil {
			t.Fatalf("fill ms_socks (entry %d of %d): %v", i+1, m.MaxEntries(), err)
		}
	}
	key := redirect.CaptureMsSockKey{Netns: ^uint64(0), LocalPort: 0xffff}
	if err := m.Update(&key, uint64(0), ebpf.UpdateNoExist); err == nil {
		t.Fatal("ms_socks took one more entry than its size")
	}
}

// TestFullSocketMapFallsBackToTCP: with ms_socks full, a new connection
// between two sidecar-injected pods is captured, not spliced, and works
// over plain TCP; the failed inserts are counted and `meshsplice status`
// shows the full table.
func TestFullSocketMapFallsBackToTCP(t *testing.T) {
	m := newMeshOpts(t, datapath.Options{MaxEntries: map[string]uint32{redirect.CaptureMapMsSocks: 4}})
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	client := m.addPod(node, "client", injected())
	server := m.addPod(node, "server", injected())
	target := netip.AddrPortFrom(server.IPv4, appPort)

	before := m.counters()
	m.client(client, appUID, target, "--messages", "20")
	if d := m.counters().Sub(before); d["sockops.sock_inserted"] != 2 {
		t.Fatalf("with room in ms_socks: %v", nonZero(d))
	}
	fillSocks(t, m.pin)
	before = m.counters()
	m.client(client, appUID, target, "--messages", "20", "--size", "4000")
	d := m.counters().Sub(before)
	if d["connect.captured"] != 1 || d["sockops.sock_inserted"] != 0 || d["sockops.sock_insert_failed"] != 2 || d["sk_msg.redirected"] != 0 {
		t.Fatalf("with ms_socks full: %v", nonZero(d))
	}
	st, err := datapath.Inspect(m.pin)
	if err != nil {
		t.Fatal(err)
	}
	var full, counted bool
	for _, p := range st.Pressure {
		full = full || p.Map == redirect.CaptureMapMsSocks && p.Entries == 4 && p.MaxEntries == 4
		counted = counted || p.Counter == "sockops.sock_insert_failed" && p.Count == 2
	}
	if !full || !counted {
		t.Fatalf("status pressure: %+v", st.Pressure)
	}
}

// smallMapsWorld is agentWorld with a datapath pinned already whose maps
// have the given sizes: the agent started on it keeps them.
func smallMapsWorld(t *testing.T, meshYAML string, sizes map[string]uint32) (*mesh, string) {
	t.Helper()
	m, configDir := agentWorld(t, meshYAML)
	dp, err := datapath.Open(datapath.Options{PinDir: m.pin, CgroupPath: m.cg.Path, MaxEntries: sizes})
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()
	return m, configDir
}

// TestAgentReportsFullTables: the agent logs a full table once per
// interval, answers 503 on /readyz naming it while it overflows, and 200
// again once an interval passes without overflow. The datapath is created
// first with a small ms_socks; the agent keeps the size of the pinned map.
func TestAgentReportsFullTables(t *testing.T) {
	m, configDir := smallMapsWorld(t, "trustDomain: demo.local\n", map[string]uint32{redirect.CaptureMapMsSocks: 2})
	ag := newAgent(t, m, configDir)
	ag.args = append(ag.args, "--pressure-interval", "1s")
	ag.withLogs()
	ag.start()
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	client := m.addPod(node, "client", nil)
	server := m.addPod(node, "server", nil)
	for _, p := range []*meshPod{client, server} {
		ag.register(p, injected())
		p.Sidecar = m.start(p, p.Name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	fillSocks(t, m.pin)
	m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "20")

	readyz := func() (int, string) {
		resp, err := http.Get("http://" + ag.metrics + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}
	waitUntil(t, "/readyz 503 naming ms_socks", 10*time.Second, func() bool {
		code, body := readyz()
		return code == http.StatusServiceUnavailable && strings.Contains(body, "ms_socks") && strings.Contains(body, "sock_insert_failed x2")
	})
	if _, err := ag.proc.WaitLine(5*time.Second, func(l string) bool { return strings.Contains(l, "kernel tables at their limit") }); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "/readyz 200 after a quiet interval", 10*time.Second, func() bool {
		code, _ := readyz()
		return code == http.StatusOK
	})
	logged := 0
	for _, l := range ag.proc.Lines() {
		if strings.Contains(l, "kernel tables at their limit") {
			logged++
		}
	}
	if logged != 1 {
		t.Fatalf("one overflow logged %d times, want once", logged)
	}
	if st := ag.status(m.pin); len(st.Pressure) == 0 {
		t.Fatal("status shows no pressure")
	}
}

// TestKernelWithoutFeature: a kernel that refuses one program. Without an
// optional one (sk_msg, bpf_sock_destroy) the datapath runs the rest and
// says what is off; without a required one Open fails naming the feature
// and the Linux release that has it, and leaves the running datapath (an
// upgrade) or the cgroup (a first start) as it was: traffic never breaks.
func TestKernelWithoutFeature(t *testing.T) {
	refuse := func(name string) func(string) error {
		return func(prog string) error {
			if prog == name {
				return fmt.Errorf("refused by the test: %w", ebpf.ErrNotSupported)
			}
			return nil
		}
	}
	t.Run("optional", func(t *testing.T) {
		for _, tc := range []struct{ program, kernel string }{
			{"ms_sk_msg", "4.17"},
			{"ms_policy_teardown", "6.5"},
		} {
			t.Run(tc.program, func(t *testing.T) {
				m := newMeshOpts(t, datapath.Options{RefuseProgram: refuse(tc.program)})
				node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
				client := m.addPod(node, "client", injected())
				server := m.addPod(node, "server", injected())
				before := m.counters()
				m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "20")
				d := m.counters().Sub(before)
				if d["connect.captured"] != 1 || d["sk_lookup.captured"] != 1 {
					t.Fatalf("capture without %s: %v", tc.program, nonZero(d))
				}
				switch tc.program {
				case "ms_sk_msg":
					if n, _ := m.dp.Node(); n.Splice || d["sockops.sock_inserted"] != 0 {
						t.Fatalf("splice without sk_msg: node %+v, counters %v", n, nonZero(d))
					}
					if _, err := os.Stat(filepath.Join(m.pin, "sk_msg")); !errors.Is(err, os.ErrNotExist) {
						t.Fatalf("sk_msg pinned: %v", err)
					}
					f := m.dp.MissingFeatures()
					if len(f) != 1 || !strings.Contains(f[0].Name, "sk_msg") || !strings.Contains(f[0].Kernel, tc.kernel) {
						t.Fatalf("missing features: %+v", f)
					}
				case "ms_policy_teardown":
					if m.dp.TeardownSupported() || d["sockops.sock_inserted"] != 2 {
						t.Fatalf("teardown supported %v, counters %v", m.dp.TeardownSupported(), nonZero(d))
					}
				}
			})
		}
	})
	t.Run("required", func(t *testing.T) {
		for _, tc := range []struct{ program, feature, kernel string }{
			{"ms_connect4", "cgroup/connect4", "4.17"},
			{"ms_getsockopt", "cgroup/getsockopt", "5.3"},
			{"ms_sk_lookup", "sk_lookup", "5.9"},
			{"ms_listener_iter", "iter/tcp", "5.9"},
			{"ms_sockops", "sockops", "4.18"},
		} {
			t.Run(tc.program, func(t *testing.T) {
				// First start: nothing attaches.
				cg := testnet.NewCgroup(t)
				pin := testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
				_, err := datapath.Open(datapath.Options{PinDir: pin, CgroupPath: cg.Path, RefuseProgram: refuse(tc.program)})
				if !errors.Is(err, ebpf.ErrNotSupported) || !strings.Contains(err.Error(), tc.feature) || !strings.Contains(err.Error(), "Linux >= "+tc.kernel) {
					t.Fatalf("open without %s: %v", tc.program, err)
				}
				if n := attachedCgroupPrograms(t, cg.Path); n != 0 {
					t.Fatalf("%d programs attached after a failed first start", n)
				}

				// Upgrade: the running datapath stays and keeps capturing.
				m := newMesh(t)
				node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
				client := m.addPod(node, "client", injected())
				server := m.addPod(node, "server", injected())
				if _, err := datapath.Open(datapath.Options{PinDir: m.pin, CgroupPath: m.cg.Path, RefuseProgram: refuse(tc.program)}); err == nil {
					t.Fatal("upgrade without a required feature opened")
				}
				if n := attachedCgroupPrograms(t, m.cg.Path); n != 4 {
					t.Fatalf("%d programs attached after a failed upgrade, want 4", n)
				}
				before := m.counters()
				m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "20")
				if d := m.counters().Sub(before); d["connect.captured"] != 1 || d["sockops.sock_inserted"] != 2 {
					t.Fatalf("after a failed upgrade: %v", nonZero(d))
				}
			})
		}
	})
}

// TestFullRegistryRefusesAndRollsBack: a registration that does not fit
// the registry tables is refused as a whole (no pod entry, no address
// left behind), the pods registered before keep working, and status names
// the full table.
func TestFullRegistryRefusesAndRollsBack(t *testing.T) {
	for _, tc := range []struct {
		table string
		size  uint32
	}{
		{redirect.CaptureMapMsPods, 1},
		{redirect.CaptureMapMsPodIps, 3}, // the second pod's second address does not fit
	} {
		t.Run(tc.table, func(t *testing.T) {
			m := newMeshOpts(t, datapath.Options{MaxEntries: map[string]uint32{tc.table: tc.size}})
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			first := m.addPod(node, "first", injected())
			second := m.addPod(node, "second", nil)
			err := m.dp.AddPod(datapath.Pod{NetnsPath: second.NS.Path(), Cookie: second.Cookie,
				IPs: []netip.Addr{second.IPv4, second.IPv6}, Traffic: first.Traffic})
			if err == nil {
				t.Fatal("a registration that does not fit was accepted")
			}
			t.Logf("refused as expected: %v", err)
			st, err := datapath.Inspect(m.pin)
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Pods) != 1 || st.Pods[0].Cookie != first.Cookie || len(st.Pods[0].IPs) != 2 {
				t.Fatalf("kernel pods after a refused registration: %+v", st.Pods)
			}
			if owner := ipOwner(t, m.pin, second.IPv4); owner != 0 {
				t.Fatalf("the refused pod's address stayed in ms_pod_ips (owner %d)", owner)
			}
			before := m.counters()
			m.client(first, appUID, netip.AddrPortFrom(second.IPv4, appPort), "--messages", "5")
			if d := m.counters().Sub(before); d["connect.captured"] != 1 {
				t.Fatalf("the registered pod after a refused registration: %v", nonZero(d))
			}
			if tc.table == redirect.CaptureMapMsPods {
				full := false
				for _, p := range st.Pressure {
					full = full || p.Map == tc.table && p.Entries == 1 && p.MaxEntries == 1
				}
				if !full {
					t.Fatalf("status pressure: %+v", st.Pressure)
				}
			}
		})
	}
}

package main

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/internal/testnet"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if left := testnet.Leftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "mstest: leftovers after tests: %v\n", left)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

const sidecarUID = 1337

// startServer starts an mstest server subcommand in ns and waits for its
// ready event.
func startServer(t *testing.T, bin string, opts testnet.StartOpts, args ...string) *testnet.Proc {
	t.Helper()
	opts.Args = append([]string{bin}, args...)
	if opts.Name == "" {
		opts.Name = args[0]
	}
	p := testnet.Start(t, opts)
	if _, err := p.WaitEvent(10*time.Second, "ready"); err != nil {
		t.Fatal(err)
	}
	return p
}

// clientRun runs "mstest client" in ns to completion and returns its
// result events; it fails the test unless the client exits with want
// success.
func clientRun(t *testing.T, bin string, ns *testnet.NetNS, wantOK bool, args ...string) []testnet.Event {
	t.Helper()
	p := testnet.Start(t, testnet.StartOpts{NetNS: ns, Name: "client", Args: append([]string{bin, "client"}, args...)})
	err := p.WaitTimeout(60 * time.Second)
	if wantOK && err != nil {
		t.Fatalf("client %s: %v", strings.Join(args, " "), err)
	}
	if !wantOK && err == nil {
		t.Fatalf("client %s succeeded, want failure", strings.Join(args, " "))
	}
	var results []testnet.Event
	for _, ev := range p.Events() {
		if ev.Str("event") == "result" {
			results = append(results, ev)
		}
	}
	return results
}

func target(ip netip.Addr, port int) string {
	return netip.AddrPortFrom(ip, uint16(port)).String()
}

// TestServersAndClient runs the three echo servers in one pod and the client
// in another pod of the same node, over IPv4 and IPv6, request/response and
// pipelined, and the echo server across two nodes. No BPF is involved.
func TestServersAndClient(t *testing.T) {
	testnet.RequireRoot(t)
	bin := testnet.BuildBinary(t, ".")
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	srv := bn.AddPod(t, "srv")
	cli := bn.AddPod(t, "cli")
	cg := testnet.NewCgroup(t)

	servers := []struct {
		mode string
		port int
		proc *testnet.Proc
	}{
		{mode: "echo", port: 7001},
		{mode: "splice-server", port: 7002},
		{mode: "fionread-server", port: 7003},
	}
	for i := range servers {
		s := &servers[i]
		s.proc = startServer(t, bin, testnet.StartOpts{NetNS: srv.NS, Cgroup: cg}, s.mode, "--port", strconv.Itoa(s.port))
	}

	for _, s := range servers {
		for _, ip := range []netip.Addr{srv.IPv4, srv.IPv6} {
			for _, pipelined := range []bool{false, true} {
				name := fmt.Sprintf("%s/%s/pipelined=%v", s.mode, map[bool]string{true: "v4", false: "v6"}[ip.Is4()], pipelined)
				t.Run(name, func(t *testing.T) {
					args := []string{"--target", target(ip, s.port), "--messages", "30", "--size", "1500"}
					conns := 1
					if pipelined {
						conns = 3
						args = []string{"--target", target(ip, s.port), "--messages", "300", "--size", "7000", "--pipelined", "--conns", "3"}
					}
					results := clientRun(t, bin, cli.NS, true, args...)
					if len(results) != conns {
						t.Fatalf("%d result events, want %d", len(results), conns)
					}
					wantLocal := cli.IPv4
					if ip.Is6() {
						wantLocal = cli.IPv6
					}
					for _, r := range results {
						if !r.Bool("ok") {
							t.Errorf("result not ok: %v", r)
						}
						local, err := netip.ParseAddrPort(r.Str("local"))
						if err != nil || local.Addr() != wantLocal {
							t.Errorf("client local address %q, want %s", r.Str("local"), wantLocal)
						}
						if r.Str("remote") != target(ip, s.port) {
							t.Errorf("client remote address %q, want %s", r.Str("remote"), target(ip, s.port))
						}
						// The server saw the client's address, v4-mapped on
						// its dual-stack socket for IPv4.
						_, err = s.proc.WaitEvent(5*time.Second, "accept", func(ev testnet.Event) bool {
							return ev.Str("peer") == r.Str("local")
						})
						if err != nil {
							t.Error(err)
						}
						closeEv, err := s.proc.WaitEvent(5*time.Second, "close", func(ev testnet.Event) bool {
							return ev.Str("peer") == r.Str("local")
						})
						if err != nil {
							t.Fatal(err)
						}
						if closeEv.Str("error") != "" || closeEv.Int("bytes") != r.Int("bytes") {
							t.Errorf("server close event %v, client sent %d bytes", closeEv, r.Int("bytes"))
						}
						switch s.mode {
						case "splice-server":
							if closeEv.Int("splice_calls") == 0 {
								t.Errorf("splice-server made no splice calls: %v", closeEv)
							}
						case "fionread-server":
							if closeEv.Int("reads") == 0 || closeEv.Int("fionread_max") == 0 {
								t.Errorf("fionread-server saw no FIONREAD values: %v", closeEv)
							}
						}
					}
				})
			}
		}
	}

	t.Run("interval-hold", func(t *testing.T) {
		start := time.Now()
		results := clientRun(t, bin, cli.NS, true, "--target", target(srv.IPv4, 7003), "--messages", "5", "--size", "10",
			"--interval", "50ms", "--hold", "300ms")
		if len(results) != 1 || !results[0].Bool("ok") {
			t.Fatalf("results %v", results)
		}
		if d := time.Since(start); d < 500*time.Millisecond {
			t.Errorf("client with --interval 50ms --hold 300ms finished in %v", d)
		}
	})

	t.Run("processes-in-cgroup", func(t *testing.T) {
		procs, err := cg.Procs()
		if err != nil {
			t.Fatal(err)
		}
		if len(procs) != len(servers) {
			t.Fatalf("cgroup holds %v, want the %d servers", procs, len(servers))
		}
	})
}

// TestCrossNode runs the echo server on node B and the client on node A.
func TestCrossNode(t *testing.T) {
	testnet.RequireRoot(t)
	bin := testnet.BuildBinary(t, ".")
	na := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{Name: "na"})
	nb := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{Name: "nb"})
	testnet.ConnectNodes(t, na, nb)
	a := na.AddPod(t, "a")
	b := nb.AddPod(t, "b")
	startServer(t, bin, testnet.StartOpts{NetNS: b.NS}, "echo", "--port", "8080")
	for _, ip := range []netip.Addr{b.IPv4, b.IPv6} {
		for _, r := range clientRun(t, bin, a.NS, true, "--target", target(ip, 8080), "--messages", "50", "--size", "20000", "--pipelined") {
			if !r.Bool("ok") {
				t.Errorf("result %v", r)
			}
		}
	}
}

// TestSidecarWithoutRedirect connects straight to the sidecar's listeners.
// Nothing redirected the connections, so SO_ORIGINAL_DST fails with ENOENT:
// the sidecar must report an error event per connection and keep running.
func TestSidecarWithoutRedirect(t *testing.T) {
	testnet.RequireRoot(t)
	bin := testnet.BuildBinary(t, ".")
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pod := bn.AddPod(t, "sc")
	cli := bn.AddPod(t, "cli")

	for _, v4only := range []bool{false, true} {
		t.Run(fmt.Sprintf("listen-v4only=%v", v4only), func(t *testing.T) {
			args := []string{"sidecar", "--outbound-port", "15001", "--inbound-port", "15006"}
			if v4only {
				args = append(args, "--listen-v4only")
			}
			sc := testnet.Start(t, testnet.StartOpts{NetNS: pod.NS, UID: sidecarUID, GID: sidecarUID, Name: "sidecar", Args: append([]string{bin}, args...)})
			ready, err := sc.WaitEvent(10*time.Second, "ready")
			if err != nil {
				t.Fatal(err)
			}
			wantReady := "[::]:15001"
			if v4only {
				wantReady = "0.0.0.0:15001"
			}
			if ready.Str("outbound") != wantReady {
				t.Errorf("ready event %v, want outbound %s", ready, wantReady)
			}
			cases := []struct {
				ip       netip.Addr
				port     int
				listener string
				level    string
			}{
				{pod.IPv4, 15001, "outbound", "SOL_IP SO_ORIGINAL_DST"},
				{pod.IPv4, 15006, "inbound", "SOL_IP SO_ORIGINAL_DST"},
				{pod.IPv6, 15001, "outbound", "SOL_IPV6 IP6T_SO_ORIGINAL_DST"},
				{pod.IPv6, 15006, "inbound", "SOL_IPV6 IP6T_SO_ORIGINAL_DST"},
			}
			for _, c := range cases {
				if v4only && c.ip.Is6() {
					// Nothing listens on IPv6: the dial is refused.
					results := clientRun(t, bin, cli.NS, false, "--target", target(c.ip, c.port), "--messages", "1")
					if len(results) != 1 || !strings.Contains(fmt.Sprint(results[0]["errors"]), "refused") {
						t.Errorf("IPv6 dial to a v4-only sidecar: %v", results)
					}
					continue
				}
				results := clientRun(t, bin, cli.NS, false, "--target", target(c.ip, c.port), "--messages", "1")
				if len(results) != 1 || results[0].Bool("ok") {
					t.Fatalf("client results %v, want one failure", results)
				}
				ev, err := sc.WaitEvent(5*time.Second, "error", func(ev testnet.Event) bool {
					return ev.Str("peer") == results[0].Str("local")
				})
				if err != nil {
					t.Fatal(err)
				}
				if ev.Str("stage") != "orig_dst" || ev.Str("listener") != c.listener || ev.Str("errno") != "ENOENT" || !strings.Contains(ev.Str("error"), c.level) {
					t.Errorf("error event %v, want stage orig_dst, listener %s, errno ENOENT, %s", ev, c.listener, c.level)
				}
			}
			if code := sc.ExitCode(); code != -1 {
				t.Fatalf("sidecar exited with %d after failed SO_ORIGINAL_DST", code)
			}
			// The sidecar runs as the uid asked.
			status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", sc.PID()))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(status), "Uid:\t1337\t1337\t1337\t1337\n") {
				t.Errorf("sidecar credentials:\n%s", status)
			}
			if err := sc.Kill(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

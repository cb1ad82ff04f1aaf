package e2e

// Capture scenarios of issue 10 ("capture must equal Istio's rules"): each
// test is named after a case where the kernel once decided otherwise than
// istio-iptables (and istio/decide.go, its Go model).

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/redirect"
)

// TestOriginalDstWinsOverConntrack: in a pod whose netns has conntrack
// active (any nat rule, e.g. an istio-init that was left in place),
// conntrack answers SO_ORIGINAL_DST for every tracked connection, NATed or
// not: for the sidecar's accepted outbound socket it says 127.0.0.1:15001.
// The destination meshsplice stored at connect must win, or the sidecar
// forwards to itself and the connection is blackholed.
func TestOriginalDstWinsOverConntrack(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	client := m.addPod(node, "client", injected())
	// A REDIRECT rule for a port nobody uses turns conntrack on for the
	// namespace (a nat expression takes a conntrack reference; a bare
	// RETURN rule in a nat chain does not).
	for _, cmd := range []string{"iptables", "ip6tables"} {
		client.NS.Run(t, cmd, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "REDIRECT", "--to-ports", "9")
	}
	for _, v6 := range []bool{false, true} {
		t.Run(family(v6), func(t *testing.T) {
			target := netip.AddrPortFrom(server.addr(v6), appPort)
			seen := len(acceptEvents(client.Sidecar, "outbound"))
			before := m.counters()
			m.client(client, appUID, target, "--messages", "3")
			d := m.counters().Sub(before)
			out := waitAccepts(t, client.Sidecar, "outbound", seen+1)
			if len(out) != seen+1 || origDst(out[seen].Str("orig_dst")) != target {
				t.Fatalf("sidecar outbound accepts %v, want one for %s (counters %v)", out[seen:], target, nonZero(d))
			}
			if d["getsockopt.orig_dst_outbound"] != 1 || d["getsockopt.orig_dst_kernel"] != 0 {
				t.Fatalf("getsockopt counters: %v", nonZero(d))
			}
		})
	}
}

// TestEvictedOriginalDstFailsTheSidecar: ms_orig_dst is an LRU of
// MS_MAX_ORIG_DST entries for the whole node. When a captured connection's
// entry is evicted before the sidecar asked for it (the map filled up in
// between), the sidecar must get an error (Envoy then closes the
// connection), never its own listener's address; the miss and the eviction
// are counted.
func TestEvictedOriginalDstFailsTheSidecar(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	dir, err := os.MkdirTemp("", "mstest-gate-") // readable by the sidecar's uid 1337
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	gate := filepath.Join(dir, "gate")
	client := m.addPodWith(node, "client", injected(), "--orig-dst-gate", gate)

	before := m.counters()
	target := netip.AddrPortFrom(server.IPv4, appPort)
	c := m.start(client, "client", appUID, "client", "--target", target.String(), "--messages", "1", "--timeout", "20s")
	if _, err := client.Sidecar.WaitEvent(waitFor, "gate"); err != nil {
		t.Fatal(err)
	}
	// The connection's entry is stored (sockops at the SYN-ACK, before the
	// accept the sidecar just made). Fill the LRU with newer entries.
	if d := m.counters().Sub(before); d["sockops.orig_dst_stored"] != 1 {
		t.Fatalf("counters: %v", nonZero(d))
	}
	fillOrigDst(t, m.pin)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ev, err := client.Sidecar.WaitEvent(waitFor, "error")
	if err != nil {
		t.Fatalf("sidecar got an answer for an evicted destination: %v\n%s", err, strings.Join(client.Sidecar.Lines(), "\n"))
	}
	if ev.Str("stage") != "orig_dst" || ev.Str("errno") != "ENOENT" {
		t.Fatalf("sidecar error %v, want SO_ORIGINAL_DST failing with ENOENT", ev)
	}
	c.WaitTimeout(30 * time.Second)
	if res, err := c.WaitEvent(time.Second, "summary"); err != nil || res.Bool("ok") {
		t.Fatalf("client: %v %v, want a failed connection", err, res)
	}
	d := m.counters().Sub(before)
	if d["getsockopt.orig_dst_missing"] != 1 || d["getsockopt.orig_dst_outbound"] != 0 || d["getsockopt.orig_dst_inbound"] != 0 {
		t.Fatalf("getsockopt counters: %v", nonZero(d))
	}
	if d["sockops.orig_dst_evicted"] != 1 {
		t.Fatalf("eviction not counted at close: %v", nonZero(d))
	}
}

// fillOrigDst writes as many entries into the pinned ms_orig_dst as it
// holds, none of them a real socket's (netns cookie 0): every older entry
// is evicted.
func fillOrigDst(t *testing.T, pin string) {
	t.Helper()
	om, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", "ms_orig_dst"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer om.Close()
	n := int(om.MaxEntries())
	keys := make([]redirect.CaptureMsSockKey, n)
	vals := make([]redirect.CaptureMsOrig, n)
	for i := range keys {
		keys[i].LocalPort = uint16(i)
		keys[i].RemotePort = uint16(i >> 16)
		keys[i].LocalIp[0] = 0xdeadbeef
	}
	if _, err := om.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatalf("fill ms_orig_dst (%d entries): %v", n, err)
	}
}

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf/link"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

func attachedCgroupPrograms(t testing.TB, cgroup string) int {
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for _, at := range cgroupHooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatalf("query %s on %s: %v", at, cgroup, err)
		}
		n += len(res.Programs)
	}
	return n
}

func family(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
}

func (p *meshPod) addr(v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// origDst normalises an address as the sidecar prints it.
func origDst(s string) netip.AddrPort {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// TestSidecarToSidecar is the whole data path: client app -> client sidecar
// -> server sidecar -> server app and back, two pods on one node, no
// iptables. Every hop must be captured or spliced as designed, the sidecars
// must see the right original destinations, and the bytes must arrive
// intact in both directions.
func TestSidecarToSidecar(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, mode := range []struct {
			name       string
			appIngress bool
		}{{"proxy-ingress", false}, {"full-splice", true}} {
			t.Run(family(v6)+"/"+mode.name, func(t *testing.T) {
				m := newMesh(t)
				node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
				ann := injected()
				if mode.appIngress {
					ann[istio.AnnotationAppIngressSplice] = "true"
				}
				client := m.addPod(node, "client", ann)
				server := m.addPod(node, "server", ann)
				before := m.counters()

				const messages, size = 200, 1000
				target := netip.AddrPortFrom(server.addr(v6), appPort)
				c := m.client(client, appUID, target, "--messages", fmt.Sprint(messages), "--size", fmt.Sprint(size))
				_ = c
				d := m.counters().Sub(before)
				t.Logf("counters: %v", nonZero(d))

				// Capture: the app's connect went to its sidecar, which
				// learnt the original destination.
				out := acceptEvents(client.Sidecar, "outbound")
				if len(out) != 1 || origDst(out[0].Str("orig_dst")) != target {
					t.Fatalf("client sidecar outbound accepts = %v, want one with orig_dst %s", out, target)
				}
				in := acceptEvents(server.Sidecar, "inbound")
				if len(in) != 1 || origDst(in[0].Str("orig_dst")) != target {
					t.Fatalf("server sidecar inbound accepts = %v, want one with orig_dst %s", in, target)
				}
				if n := len(acceptEvents(server.App, "")); n > 1 {
					t.Fatalf("server app saw %d connections", n)
				}
				sidecarErrors(t, client, server)
				want := map[string]uint64{
					"connect.captured":             1,
					"getsockopt.orig_dst_outbound": 1,
					"getsockopt.orig_dst_inbound":  1,
					"sk_lookup.captured":           1,
				}
				for k, v := range want {
					if d[k] != v {
						t.Errorf("%s = %d, want %d", k, d[k], v)
					}
				}
				// Splice: six sockets in three connections: app<->sidecar
				// in each pod, sidecar<->sidecar between them. Each joins
				// the splice map (for its sends, or as a target).
				if d["sockops.sock_inserted"] != 6 {
					t.Errorf("sockops.sock_inserted = %d, want 6", d["sockops.sock_inserted"])
				}
				// Every send on a spliced hop is either redirected or, after
				// a miss, sent over TCP with the rest of its stream: the
				// bytes add up exactly. Request and reply each cross 4 hops
				// that may be redirected (app->sc, sc->sc twice, app->sc),
				// 6 with full splice (sc->app too).
				hops := uint64(4)
				if mode.appIngress {
					hops = 6
				}
				wire := uint64(messages * (size + 12))
				checkSpliceAccounting(t, d, hops*wire, (6-hops)*wire)
				noIptablesRules(t, client, server)
			})
		}
	}
}

func nonZero(c datapath.Counters) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range c {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// checkSpliceAccounting asserts that every byte sent on a spliced socket was
// redirected or sent over TCP after a fallback (wantSpliced in all), and
// that exactly wantByDesign bytes took TCP by design (sidecar -> app without
// app-ingress splice). It logs the misses, the number the probe worried
// about.
func checkSpliceAccounting(t *testing.T, d datapath.Counters, wantSpliced, wantByDesign uint64) {
	t.Helper()
	red, fb := d["sk_msg.bytes_redirected"], d["sk_msg.bytes_tcp_after_fallback"]
	t.Logf("redirected %d bytes in %d sends; misses: %d on a first send, %d later; %d bytes over TCP after a fallback",
		red, d["sk_msg.redirected"], d["sk_msg.miss_first_send"], d["sk_msg.miss_later_send"], fb)
	if red+fb != wantSpliced {
		t.Errorf("redirected + fallback bytes = %d + %d, want %d", red, fb, wantSpliced)
	}
	if red == 0 {
		t.Errorf("nothing was redirected")
	}
	if got := d["sk_msg.bytes_tcp_by_design"]; got != wantByDesign {
		t.Errorf("bytes over TCP by design = %d, want %d", got, wantByDesign)
	}
}

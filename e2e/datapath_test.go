package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
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
		for _, mode := range spliceModes {
			t.Run(family(v6)+"/"+mode.name, func(t *testing.T) {
				m := newMesh(t)
				node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
				ann := mode.annotations()
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
				out := waitAccepts(t, client.Sidecar, "outbound", 1)
				if len(out) != 1 || origDst(out[0].Str("orig_dst")) != target {
					t.Fatalf("client sidecar outbound accepts = %v, want one with orig_dst %s", out, target)
				}
				in := waitAccepts(t, server.Sidecar, "inbound", 1)
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
				// Splice: three connections, six sockets: app<->sidecar in
				// each pod, sidecar<->sidecar between them. By default only
				// the two sidecar<->sidecar sockets join the splice map;
				// with app-splice all six do.
				sockets, hops := uint64(2), uint64(2)
				if mode.appSplice {
					sockets, hops = 6, 6
				}
				if d["sockops.sock_inserted"] != sockets {
					t.Errorf("sockops.sock_inserted = %d, want %d", d["sockops.sock_inserted"], sockets)
				}
				if d["sockops.skip_app_socket"] != 6-sockets {
					t.Errorf("sockops.skip_app_socket = %d, want %d", d["sockops.skip_app_socket"], 6-sockets)
				}
				// Every send on a spliced socket is either redirected or,
				// after a miss, sent over TCP with the rest of its stream:
				// the bytes add up exactly. Request and reply each cross
				// the spliced hops once.
				wire := uint64(messages * (size + 12))
				checkSpliceAccounting(t, d, hops*wire, 0)
				noIptablesRules(t, client, server)

				// Closed connections leave nothing in the kernel tables.
				eventually(t, "the splice map and the original destinations to empty", func() bool {
					st, err := datapath.Inspect(m.pin)
					return err == nil && st.SplicedSockets == 0 && st.OrigDstEntries == 0
				})
			})
		}
	}
}

// spliceModes are the two ways a pod can be spliced.
var spliceModes = []spliceMode{{"sidecar-only", false}, {"app-splice", true}}

type spliceMode struct {
	name      string
	appSplice bool
}

func (m spliceMode) annotations() map[string]string {
	if m.appSplice {
		return injected(istio.AnnotationAppSplice, "true")
	}
	return injected()
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

// TestPipelinedStreams: many small writes without waiting for replies, both
// directions at once, over app <-> sidecar and sidecar <-> sidecar, every
// message checksummed and checked in order. The redirect misses the probe
// saw are counted; by construction a miss cannot reorder a stream (see
// bpf/splice.c, Ordering), and the byte accounting shows where each byte
// went.
func TestPipelinedStreams(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(family(v6), func(t *testing.T) {
			m := newMesh(t)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			ann := injected(istio.AnnotationAppSplice, "true")
			client := m.addPod(node, "client", ann)
			server := m.addPod(node, "server", ann)
			before := m.counters()
			const conns, messages, size = 4, 5000, 64
			target := netip.AddrPortFrom(server.addr(v6), appPort)
			m.client(client, appUID, target, "--pipelined", "--conns", fmt.Sprint(conns),
				"--messages", fmt.Sprint(messages), "--size", fmt.Sprint(size))
			d := m.counters().Sub(before)
			// Six hops, each direction's bytes cross three of them
			// (app->sc, sc->sc, sc->app), both directions.
			wire := uint64(conns * messages * (size + 12))
			checkSpliceAccounting(t, d, 6*wire, 0)
			sidecarErrors(t, client, server)
		})
	}
}

// TestFallbackMidStreamKeepsOrder forces what a miss does, on purpose and
// in the middle of pipelined streams: the node is switched to drain (as
// detaching does), so every sender goes from redirect to TCP while data is
// in flight in both directions. The checksummed, ordered echo must still
// verify, and the accounting must show both paths were used.
func TestFallbackMidStreamKeepsOrder(t *testing.T) {
	m, client, server := newSplicedPair(t)
	before := m.counters()
	const messages, size = 20000, 200
	target := netip.AddrPortFrom(server.IPv4, appPort)
	c := m.start(client, "client-stream", appUID, "client", "--target", target.String(), "--pipelined",
		"--messages", fmt.Sprint(messages), "--size", fmt.Sprint(size), "--interval", "20us")
	// Let the streams run spliced for a while, then fall back.
	deadline := time.Now().Add(10 * time.Second)
	for m.counters().Sub(before)["sk_msg.redirected"] < 3000 {
		if time.Now().After(deadline) {
			t.Fatal("stream did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := m.dp.SetNodeDrain(true); err != nil {
		t.Fatal(err)
	}
	finishedOK(t, c, "stream broken by the fallback")
	d := m.counters().Sub(before)
	wire := uint64(messages * (size + 12))
	checkSpliceAccounting(t, d, 6*wire, 0)
	if d["sk_msg.drain_fallbacks"] == 0 || d["sk_msg.bytes_tcp_after_fallback"] == 0 {
		t.Fatalf("no sender fell back mid-stream: %v", nonZero(d))
	}
}

// TestSameLoopbackTupleInTwoPods: two pods whose apps use the very same
// loopback 4-tuple (127.0.0.1:40000 -> 127.0.0.1:15001) at the same
// moment, both spliced. Every socket key holds the netns cookie, so no byte
// may cross: each client verifies its own seeded payload.
func TestSameLoopbackTupleInTwoPods(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	ann := injected(istio.AnnotationAppSplice, "true")
	a := m.addPod(node, "a", ann)
	b := m.addPod(node, "b", ann)
	server := m.addPod(node, "server", ann)
	before := m.counters()
	target := netip.AddrPortFrom(server.IPv4, appPort)
	var procs []*testnet.Proc
	for i, p := range []*meshPod{a, b} {
		procs = append(procs, m.start(p, p.Name+"-client", appUID, "client", "--target", target.String(),
			"--source", "127.0.0.1:40000", "--pipelined", "--messages", "5000", "--size", "512",
			"--seed", fmt.Sprint(100+i)))
	}
	for i, c := range procs {
		if err := c.WaitTimeout(60 * time.Second); err != nil {
			t.Fatalf("client %d: %v\n%s", i, err, strings.Join(c.Lines(), "\n"))
		}
		res, err := c.WaitEvent(time.Second, "result")
		if err != nil || !res.Bool("ok") {
			t.Fatalf("client %d: %v %v", i, err, res)
		}
		if res.Str("local") != "127.0.0.1:40000" || res.Str("remote") != "127.0.0.1:15001" {
			t.Fatalf("client %d used %s -> %s, want the shared tuple", i, res.Str("local"), res.Str("remote"))
		}
	}
	d := m.counters().Sub(before)
	if d["sk_msg.redirected"] == 0 {
		t.Fatal("nothing was spliced")
	}
	checkSpliceAccounting(t, d, 2*6*5000*(512+12), 0)
}

// newSplicedPair is a mesh with two pods on one node, client and server,
// every hop spliced (app-splice).
func newSplicedPair(t *testing.T) (*mesh, *meshPod, *meshPod) {
	t.Helper()
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	ann := injected(istio.AnnotationAppSplice, "true")
	return m, m.addPod(node, "client", ann), m.addPod(node, "server", ann)
}

// startStream starts a long pipelined, checksummed stream (about 1-3 s)
// from p to target; finishedOK checks it.
func (m *mesh) startStream(p *meshPod, target netip.AddrPort) *testnet.Proc {
	return m.start(p, p.Name+"-stream", appUID, "client", "--target", target.String(), "--pipelined",
		"--messages", "20000", "--size", "100", "--interval", "20us")
}

// finishedOK waits for a client started with m.start and fails the test
// (saying what) unless every one of its messages came back intact.
func finishedOK(t *testing.T, c *testnet.Proc, what string) {
	t.Helper()
	if err := c.WaitTimeout(60 * time.Second); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, strings.Join(c.Lines(), "\n"))
	}
	if sum, err := c.WaitEvent(time.Second, "summary"); err != nil || !sum.Bool("ok") {
		t.Fatalf("%s: %v %v", what, err, sum)
	}
}

// waitAccepts waits until p printed at least n accept events (of listener,
// or any for ""): its stdout is read asynchronously, so a line printed
// before the client finished may not have been read yet.
func waitAccepts(t *testing.T, p *testnet.Proc, listener string, n int) []testnet.Event {
	t.Helper()
	var evs []testnet.Event
	deadline := time.Now().Add(5 * time.Second)
	for {
		evs = evs[:0]
		for _, ev := range p.Events() {
			if ev.Str("event") == "accept" && (listener == "" || ev.Str("listener") == listener) {
				evs = append(evs, ev)
			}
		}
		if len(evs) >= n || time.Now().After(deadline) {
			return evs
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// acceptsOf returns the accept events of an echo app, by peer address.
func acceptsOf(p *testnet.Proc) []string {
	var peers []string
	for _, ev := range p.Events() {
		if ev.Str("event") == "accept" {
			peers = append(peers, ev.Str("peer"))
		}
	}
	return peers
}

// TestExclusionsGoStraightOut: what the pod's Istio settings exclude, the
// sidecar's own connections and an unregistered namespace's traffic are
// never captured: they reach the server app directly from the client pod's
// address, and the sidecars see nothing.
func TestExclusionsGoStraightOut(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil) // not meshed: its app sees the real peer
	extra := m.start(server, "server-app2", appUID, "echo", "--port", "9090")
	if _, err := extra.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	other := m.addPod(node, "other", nil)
	client := m.addPod(node, "client", injected(
		istio.AnnotationExcludeOutboundPorts, "9090",
		istio.AnnotationExcludeOutboundIPRanges, other.IPv4.String()+"/32,"+other.IPv6.String()+"/128",
	))
	plain := m.addPod(node, "plain", nil) // unregistered namespace

	cases := []struct {
		name    string
		from    *meshPod
		uid     int
		to      netip.AddrPort
		app     *testnet.Proc
		counter string // what the connect program must count
	}{
		{"excluded port v4", client, appUID, netip.AddrPortFrom(server.IPv4, 9090), extra, "connect.skip_excluded_port"},
		{"excluded port v6", client, appUID, netip.AddrPortFrom(server.IPv6, 9090), extra, "connect.skip_excluded_port"},
		{"excluded range v4", client, appUID, netip.AddrPortFrom(other.IPv4, appPort), other.App, "connect.skip_excluded_range"},
		{"excluded range v6", client, appUID, netip.AddrPortFrom(other.IPv6, appPort), other.App, "connect.skip_excluded_range"},
		{"sidecar's own connection", client, 1337, netip.AddrPortFrom(server.IPv4, appPort), server.App, "connect.skip_proxy"},
		{"unregistered namespace", plain, appUID, netip.AddrPortFrom(server.IPv4, appPort), server.App, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := m.counters()
			seen := len(acceptsOf(tc.app))
			m.client(tc.from, tc.uid, tc.to, "--messages", "5")
			d := m.counters().Sub(before)
			waitAccepts(t, tc.app, "", seen+1)
			peers := acceptsOf(tc.app)
			if len(peers) != seen+1 {
				t.Fatalf("server app accepted %d new connections, want 1", len(peers)-seen)
			}
			wantSrc := tc.from.addr(tc.to.Addr().Is6())
			if got := origDst(peers[len(peers)-1]).Addr(); got != wantSrc {
				t.Fatalf("server app saw peer %s, want the client pod's own address %s", got, wantSrc)
			}
			if n := len(acceptEvents(client.Sidecar, "outbound")); n != 0 {
				t.Fatalf("client sidecar accepted %d connections", n)
			}
			if tc.counter != "" && d[tc.counter] != 1 {
				t.Fatalf("%s = %d, want 1 (%v)", tc.counter, d[tc.counter], nonZero(d))
			}
			if tc.counter == "" {
				for k, v := range nonZero(d) {
					t.Errorf("unregistered namespace touched the datapath: %s = %d", k, v)
				}
			}
		})
	}
	noIptablesRules(t, client)
}

// TestInboundExclusions: excludeInboundPorts and the sidecar's own ports
// reach the app directly; other ports go through the sidecar.
func TestInboundExclusions(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", injected(istio.AnnotationExcludeInboundPorts, "9090"))
	extra := m.start(server, "server-app2", appUID, "echo", "--port", "9090")
	if _, err := extra.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	client := m.addPod(node, "client", nil)
	before := m.counters()
	m.client(client, appUID, netip.AddrPortFrom(server.IPv4, 9090), "--messages", "3")
	m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "3")
	d := m.counters().Sub(before)
	if d["sk_lookup.skip_excluded_port"] != 1 || d["sk_lookup.captured"] != 1 {
		t.Fatalf("sk_lookup counters: %v", nonZero(d))
	}
	waitAccepts(t, extra, "", 1)
	if peers := acceptsOf(extra); len(peers) != 1 || origDst(peers[0]).Addr() != client.IPv4 {
		t.Fatalf("excluded port app saw %v, want the client directly", peers)
	}
	if in := waitAccepts(t, server.Sidecar, "inbound", 1); len(in) != 1 ||
		origDst(in[0].Str("orig_dst")) != netip.AddrPortFrom(server.IPv4, appPort) {
		t.Fatalf("server sidecar inbound accepts: %v", in)
	}
}

// TestInboundFailsClosedWithoutSidecar: a meshed pod whose sidecar is not
// listening refuses inbound connections at once (RST), as Istio's REDIRECT
// to a closed 15006 does, instead of letting them reach the app around the
// sidecar.
func TestInboundFailsClosedWithoutSidecar(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", injected())
	client := m.addPod(node, "client", nil)
	server.Sidecar.Kill()
	server.Sidecar.Wait()
	if ok, err := m.dp.ListenerReady(server.Cookie); err != nil || ok {
		t.Fatalf("listener still registered after the sidecar died: %v %v", ok, err)
	}
	before := m.counters()
	c := m.start(client, "client", appUID, "client", "--target", netip.AddrPortFrom(server.IPv4, appPort).String(), "--timeout", "3s")
	c.WaitTimeout(10 * time.Second)
	res, err := c.WaitEvent(time.Second, "result")
	if err != nil || res.Bool("ok") {
		t.Fatalf("connection to a pod without sidecar succeeded: %v %v", err, res)
	}
	if errs := fmt.Sprint(res["errors"]); !strings.Contains(errs, "refused") {
		t.Fatalf("want connection refused, got %s", errs)
	}
	if d := m.counters().Sub(before); d["sk_lookup.refused_no_listener"] != 1 {
		t.Fatalf("counters: %v", nonZero(d))
	}
	if n := len(acceptsOf(server.App)); n != 0 {
		t.Fatalf("app was reached around the sidecar %d times", n)
	}
}

// TestSpliceAndFionreadReaders: the sockmap traps for applications.
//   - splice(2) never sees data redirected into a socket's BPF ingress
//     queue. So, by default, meshsplice never redirects into an app's
//     socket: a splice(2) reader behind a meshed sidecar works. With the
//     full-splice opt-in (app-splice) this reader, which does not fall back
//     on EINVAL, cannot read its first connection (refused by the guard or
//     reset by the detector: TestEveryReaderAndWriter, whose splice reader
//     falls back); if a kernel ever
//     fixes the trap, the test says so.
//   - ioctl(FIONREAD) was reported to return 0 on sockmap'd sockets on older
//     kernels; here a reader that trusts FIONREAD must work in both modes
//     (it reads only the FIONREAD count).
func TestSpliceAndFionreadReaders(t *testing.T) {
	for _, mode := range spliceModes {
		t.Run(mode.name, func(t *testing.T) {
			m := newMesh(t)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			ann := mode.annotations()
			server := m.addPod(node, "server", ann)
			client := m.addPod(node, "client", ann)
			for _, srv := range []struct{ mode, port string }{{"splice-server", "8081"}, {"fionread-server", "8082"}} {
				p := m.start(server, srv.mode, appUID, srv.mode, "--port", srv.port)
				if _, err := p.WaitEvent(waitFor, "ready"); err != nil {
					t.Fatal(err)
				}
			}

			before := m.counters()
			fr := m.client(client, appUID, netip.MustParseAddrPort(server.IPv4.String()+":8082"), "--pipelined", "--messages", "500", "--size", "300")
			_ = fr
			d := m.counters().Sub(before)
			if mode.appSplice && d["sk_msg.redirected"] == 0 {
				t.Fatal("FIONREAD reader was not behind a spliced socket")
			}

			target := server.IPv4.String() + ":8081"
			if !mode.appSplice {
				m.client(client, appUID, netip.MustParseAddrPort(target), "--messages", "200", "--size", "1000")
				return
			}
			c := m.start(client, "splice-client", appUID, "client", "--target", target, "--messages", "3", "--timeout", "2s")
			c.WaitTimeout(20 * time.Second)
			res, _ := c.WaitEvent(time.Second, "result")
			if res.Bool("ok") {
				t.Fatal("a splice(2) reader saw data redirected into its socket: the kernel no longer has the trap; revisit app-splice")
			}
			t.Logf("as expected, the splice(2) reader never saw redirected data: %v", res["errors"])
		})
	}
}

// TestDetachLeavesNothing: after Detach no program is attached to the
// cgroup or to any pod's netns, and nothing is pinned; live connections
// that were spliced keep working over TCP.
func TestDetachLeavesNothing(t *testing.T) {
	m, client, server := newSplicedPair(t)
	target := netip.AddrPortFrom(server.IPv4, appPort)
	c := m.startStream(client, target)
	time.Sleep(300 * time.Millisecond)

	// The agent is gone (its Go handles closed); then uninstall.
	m.dp.Close()
	if err := datapath.Detach(m.pin, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if n := attachedCgroupPrograms(t, m.cg.Path); n != 0 {
		t.Fatalf("%d programs still attached to the cgroup", n)
	}
	for _, p := range []*meshPod{client, server} {
		f, err := os.Open(p.NS.Path())
		if err != nil {
			t.Fatal(err)
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachSkLookup})
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Programs) != 0 {
			t.Fatalf("sk_lookup still attached to %s", p.Name)
		}
	}
	if _, err := os.Stat(m.pin); !os.IsNotExist(err) {
		t.Fatalf("pin dir still there: %v", err)
	}
	finishedOK(t, c, "live connection broken by detach")
}

// TestV4MappedAndV4OnlySockets: a dual-stack C-style app (AF_INET6 socket
// connecting to ::ffff:a.b.c.d, which runs only cgroup/connect6) talking
// through sidecars that listen on 0.0.0.0 like Envoy's IPv4 listeners
// (AF_INET accepted sockets): the keys of the two ends still meet, for the
// original destination and for the splice.
func TestV4MappedAndV4OnlySockets(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	ann := injected(istio.AnnotationAppSplice, "true")
	client := m.addPodWith(node, "client", ann, "--listen-v4only")
	server := m.addPodWith(node, "server", ann, "--listen-v4only")
	before := m.counters()
	target := netip.AddrPortFrom(server.IPv4, appPort)
	c := m.client(client, appUID, target, "--v4mapped", "--messages", "100", "--size", "500")
	res, _ := c.WaitEvent(time.Second, "result")
	if !strings.HasPrefix(res.Str("local"), "127.0.0.1:") || res.Str("remote") != "127.0.0.1:15001" {
		t.Fatalf("client socket %s -> %s, want a v4-mapped loopback pair", res.Str("local"), res.Str("remote"))
	}
	d := m.counters().Sub(before)
	if out := waitAccepts(t, client.Sidecar, "outbound", 1); len(out) != 1 || origDst(out[0].Str("orig_dst")) != target {
		t.Fatalf("outbound accepts: %v", out)
	}
	if d["connect.captured"] != 1 || d["sockops.sock_inserted"] != 6 {
		t.Fatalf("counters: %v", nonZero(d))
	}
	checkSpliceAccounting(t, d, 6*100*512, 0)
}

// TestAgentGoneAndUpgradeInPlace: the datapath lives in the kernel, pinned.
// With the agent's handles closed, new connections are still captured and
// spliced; a new agent reopening the pins updates the programs in place
// while a spliced stream is running, and that stream never notices.
func TestAgentGoneAndUpgradeInPlace(t *testing.T) {
	m, client, server := newSplicedPair(t)
	target := netip.AddrPortFrom(server.IPv4, appPort)
	stream := m.startStream(client, target)
	if _, err := server.Sidecar.WaitEvent(waitFor, "upstream"); err != nil {
		t.Fatal(err)
	}

	m.dp.Close() // the agent is gone
	before, err := datapath.ReadPinnedCounters(m.pin)
	if err != nil {
		t.Fatal(err)
	}
	m.client(client, appUID, target, "--messages", "50")
	after, err := datapath.ReadPinnedCounters(m.pin)
	if err != nil {
		t.Fatal(err)
	}
	d := after.Sub(before)
	if d["connect.captured"] != 1 || d["sk_lookup.captured"] != 1 || d["sockops.sock_inserted"] != 6 {
		t.Fatalf("without the agent: %v", nonZero(d))
	}

	// A new agent: same pins, programs replaced in place.
	dp, err := datapath.Open(datapath.Options{PinDir: m.pin, CgroupPath: m.cg.Path,
		Node: datapath.NodeSettings{Capture: true, Splice: true}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	if n := attachedCgroupPrograms(t, m.cg.Path); n != 4 {
		t.Fatalf("%d programs on the cgroup after the upgrade, want 4", n)
	}
	pods, err := dp.Pods()
	if err != nil || len(pods) != 2 {
		t.Fatalf("pods after the upgrade: %v %v", pods, err)
	}
	m.dp = dp
	m.client(client, appUID, target, "--messages", "50")
	finishedOK(t, stream, "stream broken")
}

// TestManyNewConnections: the case where a redirect can miss its peer, the
// first send of a fresh connection racing the peer's PASSIVE_ESTABLISHED on
// the other CPU. Hundreds of connections each send at once after connect;
// every byte must arrive, and the accounting says how many streams fell back.
func TestManyNewConnections(t *testing.T) {
	m, client, server := newSplicedPair(t)
	before := m.counters()
	const rounds, conns = 5, 64
	for range rounds {
		m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--conns", fmt.Sprint(conns), "--messages", "2", "--size", "100")
	}
	d := m.counters().Sub(before)
	if d["sockops.sock_inserted"] != rounds*conns*6 {
		t.Errorf("sockops.sock_inserted = %d, want %d", d["sockops.sock_inserted"], rounds*conns*6)
	}
	checkSpliceAccounting(t, d, rounds*conns*6*2*112, 0)
}

// TestMPTCPSidecarListener: a sidecar that listens with MPTCP (what Go does
// by default since 1.24) has a listener a sockmap refuses. meshsplice
// counts it and inbound connections are refused, never sent around the
// sidecar to the app.
func TestMPTCPSidecarListener(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	client := m.addPod(node, "client", nil)
	tr, _, err := istio.ParseTraffic(injected(), testDefaults())
	if err != nil {
		t.Fatal(err)
	}
	if err := m.dp.AddPod(datapath.Pod{NetnsPath: server.NS.Path(), Cookie: server.Cookie,
		IPs: []netip.Addr{server.IPv4, server.IPv6}, Traffic: tr}); err != nil {
		t.Fatal(err)
	}
	before := m.counters()
	sc := m.startEnv(server, "mptcp-sidecar", 1337, []string{"GODEBUG=multipathtcp=1"}, "sidecar")
	if _, err := sc.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(waitFor)
	for m.counters().Sub(before)["listener_iter.listener_refused"] == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("MPTCP listener not reported: %v", nonZero(m.counters().Sub(before)))
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := m.start(client, "client", appUID, "client", "--target", netip.AddrPortFrom(server.IPv4, appPort).String(), "--timeout", "3s")
	c.WaitTimeout(10 * time.Second)
	if res, _ := c.WaitEvent(time.Second, "result"); res.Bool("ok") || !strings.Contains(fmt.Sprint(res["errors"]), "refused") {
		t.Fatalf("want connection refused, got %v", res)
	}
	if n := len(acceptsOf(server.App)); n != 0 {
		t.Fatalf("app reached around the sidecar %d times", n)
	}
}

// TestSwitchesNeverBreakLiveConnections: while spliced streams run, the
// pod is re-registered opted out of splice and then of capture, and the
// node switches go off. New connections follow the switches at once; the
// live streams finish intact.
func TestSwitchesNeverBreakLiveConnections(t *testing.T) {
	m, client, server := newSplicedPair(t)
	target := netip.AddrPortFrom(server.IPv4, appPort)
	stream := m.startStream(client, target)
	if _, err := server.Sidecar.WaitEvent(waitFor, "upstream"); err != nil {
		t.Fatal(err)
	}
	reregister := func(ann map[string]string) {
		tr, _, err := istio.ParseTraffic(ann, testDefaults())
		if err != nil {
			t.Fatal(err)
		}
		if err := m.dp.AddPod(datapath.Pod{NetnsPath: client.NS.Path(), Cookie: client.Cookie,
			IPs: []netip.Addr{client.IPv4, client.IPv6}, Traffic: tr}); err != nil {
			t.Fatal(err)
		}
	}
	before := m.counters()
	reregister(injected(istio.AnnotationSplice, "disabled"))
	m.client(client, appUID, target, "--messages", "10")
	// The client pod's four sockets are left alone (its own three and the
	// server sidecar's end facing it); the server pod's in-pod pair still
	// splices, as that pod says.
	if d := m.counters().Sub(before); d["connect.captured"] != 1 || d["sockops.skip_splice_off"] != 4 || d["sockops.sock_inserted"] != 2 {
		t.Fatalf("pod splice off: %v", nonZero(d))
	}
	before = m.counters()
	reregister(injected(istio.AnnotationCapture, "disabled"))
	m.client(client, appUID, target, "--messages", "10")
	if d := m.counters().Sub(before); d["connect.captured"] != 0 {
		t.Fatalf("pod capture off: %v", nonZero(d))
	}
	if err := m.dp.SetNode(datapath.NodeSettings{}); err != nil {
		t.Fatal(err)
	}
	before = m.counters()
	m.client(client, appUID, netip.AddrPortFrom(server.IPv6, appPort), "--messages", "10")
	if d := m.counters().Sub(before); d["sk_lookup.captured"] != 0 {
		t.Fatalf("node capture off, server still captured inbound: %v", nonZero(d))
	}
	finishedOK(t, stream, "live stream broken")
}

// TestKernelFollowsIstioCaptureRules: the connect programs decide exactly
// as istio.Traffic.CaptureOutbound (the rules of istio-iptables, in Go) for
// a pod with every outbound setting used at once, for IPv4, IPv6, ports,
// ranges, loopback and the proxy's uid.
func TestKernelFollowsIstioCaptureRules(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	for _, port := range []string{"9090", "5432", "7000"} {
		p := m.start(server, "server-"+port, appUID, "echo", "--port", port)
		if _, err := p.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	ann := injected(
		istio.AnnotationIncludeOutboundIPRanges, server.IPv4.String()+"/32,"+node.PrefixV6.String(),
		istio.AnnotationExcludeOutboundIPRanges, server.IPv6.String()+"/128",
		istio.AnnotationIncludeOutboundPorts, "7000",
		istio.AnnotationExcludeOutboundPorts, "5432",
	)
	client := m.addPod(node, "client", ann)
	other := netip.MustParseAddr("10.0.0.1") // in no include range: a non-routable elsewhere
	cases := []struct {
		dst netip.AddrPort
		uid int
	}{
		{netip.AddrPortFrom(server.IPv4, appPort), appUID},
		{netip.AddrPortFrom(server.IPv4, 5432), appUID},
		{netip.AddrPortFrom(server.IPv4, 7000), appUID},
		{netip.AddrPortFrom(server.IPv4, 9090), appUID},
		{netip.AddrPortFrom(server.IPv4, appPort), 1337},
		{netip.AddrPortFrom(server.IPv6, appPort), appUID},
		{netip.AddrPortFrom(server.IPv6, 7000), appUID},
		{netip.AddrPortFrom(node.GatewayV6, appPort), appUID},
		{netip.AddrPortFrom(other, appPort), appUID},
		{netip.AddrPortFrom(other, 7000), appUID},
		{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), appPort), appUID},
		{netip.AddrPortFrom(netip.MustParseAddr("::1"), appPort), appUID},
	}
	for _, tc := range cases {
		want, reason := client.Traffic.CaptureOutbound(tc.dst, uint32(tc.uid), uint32(tc.uid))
		t.Run(fmt.Sprintf("%s uid %d", tc.dst, tc.uid), func(t *testing.T) {
			before := m.counters()
			c := m.start(client, "probe", tc.uid, "client", "--target", tc.dst.String(), "--messages", "1", "--timeout", "1s")
			c.WaitTimeout(20 * time.Second)
			got := m.counters().Sub(before)["connect.captured"] == 1
			if got != want {
				t.Fatalf("kernel captured=%v, istio.CaptureOutbound says %v (%s)", got, want, reason)
			}
		})
	}
}

// TestKernelFollowsIstioInboundRules: sk_lookup decides exactly as
// istio.Traffic.CaptureInbound for pods with "*" plus exclusions and with
// an explicit port list, over IPv4 and IPv6.
func TestKernelFollowsIstioInboundRules(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	star := m.addPod(node, "star", injected(istio.AnnotationExcludeInboundPorts, "9090"))
	list := m.addPod(node, "list", injected(istio.AnnotationIncludeInboundPorts, "8080,7000"))
	for _, p := range []*meshPod{star, list} {
		for _, port := range []string{"9090", "7000", "15020"} {
			e := m.start(p, p.Name+"-"+port, appUID, "echo", "--port", port)
			if _, err := e.WaitEvent(waitFor, "ready"); err != nil {
				t.Fatal(err)
			}
		}
	}
	client := m.addPod(node, "client", nil)
	for _, p := range []*meshPod{star, list} {
		for _, port := range []uint16{appPort, 7000, 9090, 15020, 15006} {
			for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
				dst := netip.AddrPortFrom(ip, port)
				want, reason := p.Traffic.CaptureInbound(dst, client.addr(ip.Is6()))
				t.Run(fmt.Sprintf("%s %s", p.Name, dst), func(t *testing.T) {
					before := m.counters()
					c := m.start(client, "probe", appUID, "client", "--target", dst.String(), "--messages", "1", "--timeout", "2s")
					c.WaitTimeout(20 * time.Second)
					d := m.counters().Sub(before)
					if got := d["sk_lookup.captured"] == 1; got != want {
						t.Fatalf("kernel captured=%v, istio.CaptureInbound says %v (%s): %v", got, want, reason, nonZero(d))
					}
				})
			}
		}
	}
}

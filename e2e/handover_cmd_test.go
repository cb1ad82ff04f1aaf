package e2e

import (
	"context"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// oneHopEach makes one new connection from client to target and checks
// that it passed each sidecar exactly once, with target as its original
// destination (a second capture of either hop would have happened, and
// been printed, before the echo came back).
func oneHopEach(t *testing.T, m *mesh, client, server *meshPod, target netip.AddrPort, when string) {
	t.Helper()
	out, in := len(acceptEvents(client.Sidecar, "outbound")), len(acceptEvents(server.Sidecar, "inbound"))
	m.client(client, appUID, target, "--messages", "3")
	gotOut := waitAccepts(t, client.Sidecar, "outbound", out+1)
	gotIn := waitAccepts(t, server.Sidecar, "inbound", in+1)
	if len(gotOut) != out+1 || len(gotIn) != in+1 {
		t.Fatalf("%s: the sidecars accepted %d outbound and %d inbound connections, want 1 each", when, len(gotOut)-out, len(gotIn)-in)
	}
	if got := origDst(gotOut[out].Str("orig_dst")); got != target {
		t.Errorf("%s: outbound SO_ORIGINAL_DST %s, want %s", when, got, target)
	}
	if got := origDst(gotIn[in].Str("orig_dst")); got != target {
		t.Errorf("%s: inbound SO_ORIGINAL_DST %s, want %s", when, got, target)
	}
}

// streamIntact lets a pipelined checksummed stream move on by 20 messages
// (or fail), stops it and tells whether every byte came back intact.
func streamIntact(t *testing.T, stream *testnet.Proc) bool {
	t.Helper()
	seq := int64(0)
	// progress is what the stream verified so far; nil once it ended (a
	// failed connection ends it).
	progress := func() testnet.Event {
		t.Helper()
		seq++
		want := seq
		if stream.Signal(syscall.SIGUSR2) != nil {
			return nil
		}
		ev, err := stream.WaitEvent(waitFor, "progress", func(ev testnet.Event) bool { return ev.Int("seq") == want })
		if err != nil {
			return nil
		}
		return ev
	}
	if before := progress(); before != nil {
		waitUntil(t, "the stream moved on or failed", 30*time.Second, func() bool {
			p := progress()
			return p == nil || p.Int("failed") > 0 || p.Int("messages") >= before.Int("messages")+20
		})
	}
	stream.Signal(syscall.SIGUSR1)
	if err := stream.WaitTimeout(60 * time.Second); err != nil {
		t.Logf("stream: %v", err)
		return false
	}
	sum, _ := stream.WaitEvent(time.Second, "summary")
	return sum.Bool("ok")
}

// liveStream starts a pipelined checksummed stream from client to target
// and waits until the server's sidecar accepted it.
func liveStream(t *testing.T, m *mesh, client, server *meshPod, target netip.AddrPort) *testnet.Proc {
	t.Helper()
	stream := m.start(client, "client-stream", appUID, "client", "--target", target.String(),
		"--pipelined", "--until-signal", "--messages", "100000000", "--size", "500", "--interval", "5ms", "--timeout", "30s")
	waitAccepts(t, server.Sidecar, "inbound", 1)
	return stream
}

// iptablesState is the pod's nat and filter rules (both families) and
// its conntrack looseness, to compare runs of the handover command.
func iptablesState(t *testing.T, p *meshPod) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range [][]string{{"iptables-nft-save"}, {"ip6tables-nft-save"}, {"sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"}, {"ip", "-6", "-o", "addr", "show", "dev", "lo"}} {
		out, err := (baseline.NsenterRunner{}).Run(p.NS.Path(), "", cmd[0], cmd[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(out, "\n") {
			// Comments carry the time; counters move.
			if !strings.HasPrefix(line, "#") && !strings.HasPrefix(line, ":") {
				b.WriteString(line + "\n")
			}
		}
	}
	return b.String()
}

// removeIstioRules flushes and deletes every chain of the nat table in p's
// netns (the only table Istio's REDIRECT rules use) and checks that no
// ISTIO chain is left.
func removeIstioRules(tb testing.TB, p *meshPod) {
	tb.Helper()
	run := baseline.NsenterRunner{}
	for _, f := range []struct{ cli, save string }{{"iptables-nft", "iptables-nft-save"}, {"ip6tables-nft", "ip6tables-nft-save"}} {
		for _, args := range [][]string{{"-t", "nat", "-F"}, {"-t", "nat", "-X"}} {
			if _, err := run.Run(p.NS.Path(), "", f.cli, args...); err != nil && !strings.Contains(err.Error(), "does not exist") {
				tb.Errorf("%s %v in %s: %v", f.cli, args, p.Name, err)
			}
		}
		out, err := run.Run(p.NS.Path(), "", f.save)
		if err != nil {
			tb.Errorf("%s in %s: %v", f.save, p.Name, err)
		} else if strings.Contains(out, "ISTIO") {
			tb.Errorf("%s in %s after cleanup:\n%s", f.save, p.Name, out)
		}
	}
}

// TestHandoverCommand: `meshsplice handover --to-iptables` hands pods that
// the meshsplice template injected (no istio-init) over to Istio's own
// iptables capture, live: a checksummed stream through the handover stays
// intact; new connections pass each sidecar once with their original
// destination before it, with both captures side by side (the agent did not
// answer), after the switch to iptables mode (meshsplice splices only), and
// after `meshsplice uninstall`. Running it again changes nothing. A pod whose
// settings are not Istio's defaults, or whose netns holds some of Istio's
// chains already, is refused, named, and left as it was.
func TestHandoverCommand(t *testing.T) {
	for _, tc := range []struct {
		name     string
		meshYAML string
		v6       bool // the agent captures IPv6: the IPv6 rules are loaded too
	}{
		{"IPv4", "trustDomain: demo.local\n", false},
		{"ISTIO_DUAL_STACK", "trustDomain: demo.local\ndefaultConfig: {proxyMetadata: {ISTIO_DUAL_STACK: \"true\"}}\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testHandoverCommand(t, tc.meshYAML, tc.v6)
		})
	}
}

func testHandoverCommand(t *testing.T, meshYAML string, v6 bool) {
	m, configDir := agentWorld(t, meshYAML)
	ag := startAgent(t, m, configDir)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pods := map[string]*meshPod{}
	for _, pc := range []struct {
		name string
		ann  map[string]string
	}{
		{"client", injected()},
		{"server", injected()},
		{"custom", injected("traffic.sidecar.istio.io/excludeOutboundPorts", "9999")},
		{"partial", injected()},
	} {
		p := m.addPod(node, pc.name, nil)
		st, err := ag.client.AddPod(context.Background(), api.PodRegistration{
			ContainerID: "c-" + pc.name, Netns: p.NS.Path(), IfName: "eth0",
			IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: pc.name, PodNamespace: "shop",
			Annotations: pc.ann,
		})
		if err != nil || !st.Capture {
			t.Fatalf("register %s: capture %v, %v", pc.name, st.Capture, err)
		}
		t.Cleanup(func() { removeIstioRules(t, p) })
		pods[pc.name] = p
	}
	client, server := pods["client"], pods["server"]
	for _, p := range []*meshPod{client, server} {
		p.Sidecar = m.start(p, p.Name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := (baseline.NsenterRunner{}).Run(pods["partial"].NS.Path(), "", "iptables-nft", "-t", "nat", "-N", "ISTIO_OUTPUT"); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(server.IPv4, appPort)
	targets := []netip.AddrPort{target}
	fam := "IPv4"
	if v6 {
		targets, fam = append(targets, netip.AddrPortFrom(server.IPv6, appPort)), "IPv4 and IPv6"
	}
	connect := func(when string) {
		t.Helper()
		for _, tg := range targets {
			oneHopEach(t, m, client, server, tg, when+" to "+tg.String())
		}
	}
	eventually(t, "the sidecars' listeners in the kernel", func() bool {
		c, _ := datapath.ReadPinnedCounters(m.pin)
		return c["listener_iter.listener_registered"] >= 2
	})
	stream := liveStream(t, m, client, server, target)
	connect("meshsplice alone")

	// handover runs the command and returns its output and exit error.
	handover := func(socket string, args ...string) (string, error) {
		t.Helper()
		cmd := exec.Command(ag.bin, append([]string{"handover", "--to-iptables", "--pin-dir", m.pin,
			"--state-dir", ag.arg("--state-dir"), "--cni-socket", socket}, args...)...)
		out, err := cmd.CombinedOutput()
		t.Logf("meshsplice handover %v: %v\n%s", args, err, out)
		return string(out), err
	}
	expect := func(out string, wants ...string) {
		t.Helper()
		for _, want := range wants {
			if !strings.Contains(out, want) {
				t.Errorf("handover output lacks %q", want)
			}
		}
	}
	states := func() map[*meshPod]string {
		s := map[*meshPod]string{}
		for _, p := range pods {
			s[p] = iptablesState(t, p)
		}
		return s
	}
	unchanged := func(when string, before map[*meshPod]string, which ...*meshPod) {
		t.Helper()
		for _, p := range which {
			if after := iptablesState(t, p); after != before[p] {
				t.Errorf("%s: %s's netns changed:\nbefore:\n%s\nafter:\n%s", when, p.Name, before[p], after)
			}
		}
	}

	// --all with the agent unreachable: the rules are loaded, meshsplice
	// keeps capturing beside them; the refused pods are named.
	initial := states()
	out, err := handover(filepath.Join(t.TempDir(), "no-agent.sock"), "--all")
	if err == nil {
		t.Errorf("handover --all succeeded with two pods it must refuse")
	}
	expect(out, "could not hand over 2 pod(s): shop/custom, shop/partial",
		"shop/custom: NOT handed over: its traffic settings differ from Istio's defaults",
		"shop/partial: NOT handed over: /run/netns/", "holds some of Istio's chains but not all",
		"shop/client: set net.netfilter.nf_conntrack_tcp_loose=0 (was 1) and loaded Istio's "+fam+" rules",
		"shop/server: set net.netfilter.nf_conntrack_tcp_loose=0 (was 1) and loaded Istio's "+fam+" rules",
		"shop/client: the agent does not answer", "shop/server: the agent does not answer")
	unchanged("refused", initial, pods["custom"], pods["partial"])
	for _, p := range []*meshPod{client, server} {
		got := iptablesState(t, p)
		if n := strings.Count(got, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"); n != len(targets) || !strings.Contains(got, "\n0\n") {
			t.Errorf("%s: no Istio rules or conntrack still loose after the handover:\n%s", p.Name, got)
		}
	}
	connect("meshsplice and Istio's iptables side by side")

	// With the agent: the rules are left alone, the pods switched.
	before := states()
	out, err = handover(ag.client.Socket(), "--pod", "shop/client", "--pod", "shop/server")
	if err != nil {
		t.Fatalf("handover with the agent: %v", err)
	}
	expect(out, "shop/client: Istio's "+fam+" rules already in", "shop/server: Istio's "+fam+" rules already in",
		"shop/client: switched to iptables mode", "shop/server: switched to iptables mode")
	unchanged("second run", before, client, server)
	c0, _ := datapath.ReadPinnedCounters(m.pin)
	connect("iptables mode")
	c1, _ := datapath.ReadPinnedCounters(m.pin)
	if d := c1.Sub(c0); d["connect.captured"] != 0 || d["sk_lookup.captured"] != 0 || d["sockops.nat_matched"] != uint64(len(targets)) || d["sk_msg.redirected"] == 0 {
		t.Errorf("iptables mode: meshsplice captured, or did not splice the sidecar hop: %v", nonZero(d))
	}

	// Once more: nothing to do.
	out, err = handover(ag.client.Socket(), "--pod", "shop/client", "--pod", "shop/server")
	if err != nil {
		t.Fatalf("third handover: %v", err)
	}
	expect(out, "shop/client: already under Istio's iptables", "shop/server: already under Istio's iptables")
	unchanged("third run", before, client, server)

	ag.stop()
	if out, err := exec.Command(ag.bin, "uninstall", "--pin-dir", m.pin, "--cgroup", m.cg.Path).CombinedOutput(); err != nil {
		t.Fatalf("meshsplice uninstall: %v\n%s", err, out)
	}
	connect("Istio's iptables alone")

	if !streamIntact(t, stream) {
		t.Errorf("the stream live through the handover was not intact\n%s", stream.Tail())
	}
}

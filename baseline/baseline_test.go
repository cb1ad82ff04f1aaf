package baseline_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if left := testnet.Leftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "baseline: leftovers after tests: %v\n", left)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

const (
	sidecarUID = 1337 // Istio's proxy uid, excluded from outbound capture
	appUID     = 1000
	appPort    = 8080
)

// mstestEnv is the environment of every mstest process: Go listens with
// MPTCP by default since 1.24, Envoy does not.
var mstestEnv = []string{"GODEBUG=multipathtcp=0"}

// requireTools skips the test when a program Apply or the test runs is not
// installed.
func requireTools(t *testing.T) {
	t.Helper()
	testnet.RequireRoot(t)
	for _, tool := range []string{"nsenter", "ip", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft-save",
		"ip6tables-nft-save", "iptables-nft", "ip6tables-nft", "iptables-save", "ip6tables-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}

// apply loads the rules into ns and registers their cleanup with the test,
// so that they are removed also when the test fails. The returned function
// runs the cleanup now (later calls return the same result).
func apply(t *testing.T, ns *testnet.NetNS, ipv6 bool) func() error {
	t.Helper()
	cleanup, err := baseline.Apply(ns.Path(), baseline.Options{IPv6: ipv6})
	if err != nil {
		t.Fatalf("apply istio rules in %s: %v", ns, err)
	}
	t.Cleanup(func() {
		if err := cleanup(); err != nil {
			t.Errorf("remove istio rules from %s: %v", ns, err)
		}
	})
	return cleanup
}

// natRules returns the nat table of a family in ns as iptables-save shows
// it, and the number of rules in it.
func natRules(t *testing.T, ns *testnet.NetNS, save string) (string, int) {
	t.Helper()
	out := ns.Run(t, save, "-t", "nat")
	return out, strings.Count(out, "\n-A ")
}

func startMstest(t *testing.T, bin string, opts testnet.StartOpts, args ...string) *testnet.Proc {
	t.Helper()
	opts.Args = append([]string{bin}, args...)
	opts.Env = append(opts.Env, mstestEnv...)
	p := testnet.Start(t, opts)
	if _, err := p.WaitEvent(10*time.Second, "ready"); err != nil {
		t.Fatal(err)
	}
	return p
}

// runClient runs "mstest client" as the app uid in ns to completion and
// returns its single result event.
func runClient(t *testing.T, bin string, ns *testnet.NetNS, dst string) testnet.Event {
	t.Helper()
	p := testnet.Start(t, testnet.StartOpts{NetNS: ns, UID: appUID, GID: appUID, Name: "client", Env: mstestEnv,
		Args: []string{bin, "client", "--target", dst, "--messages", "50", "--size", "3000", "--pipelined"}})
	if err := p.WaitTimeout(60 * time.Second); err != nil {
		t.Fatalf("client --target %s: %v", dst, err)
	}
	var results []testnet.Event
	for _, ev := range p.Events() {
		if ev.Str("event") == "result" {
			results = append(results, ev)
		}
	}
	if len(results) != 1 || !results[0].Bool("ok") {
		t.Fatalf("client --target %s: results %v, want one ok", dst, results)
	}
	return results[0]
}

func countEvents(p *testnet.Proc, name string) int {
	n := 0
	for _, ev := range p.Events() {
		if ev.Str("event") == name {
			n++
		}
	}
	return n
}

// TestIstioSidecarPath loads Istio's rules into two pods of a bridge and
// checks the sidecar path Istio's iptables capture gives, over IPv4 and
// IPv6: client app (uid 1000) -> client sidecar (outbound 15001, original
// destination server:8080) -> server sidecar (inbound 15006, original
// destination server:8080) -> server app, dialled from 127.0.0.6 or ::6.
// After cleanup no ISTIO_ chain, nat hook or ::6 is left and the client
// reaches the server directly.
func TestIstioSidecarPath(t *testing.T) {
	requireTools(t)
	bin := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/e2e/mstest")
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	cli := bn.AddPod(t, "cli")
	srv := bn.AddPod(t, "srv")

	cleanups := map[*testnet.Pod]func() error{}
	for _, pod := range []*testnet.Pod{cli, srv} {
		cleanups[pod] = apply(t, pod.NS, true)
		for _, save := range []string{"iptables-save", "ip6tables-save"} {
			out, n := natRules(t, pod.NS, save)
			if n != 18 {
				t.Fatalf("%s in %s shows %d nat rules, want Istio's 18:\n%s", save, pod.Name, n, out)
			}
		}
	}

	scArgs := []string{"sidecar", "--outbound-port", "15001", "--inbound-port", "15006"}
	cliSC := startMstest(t, bin, testnet.StartOpts{NetNS: cli.NS, UID: sidecarUID, GID: sidecarUID, Name: "cli-sidecar"}, scArgs...)
	srvSC := startMstest(t, bin, testnet.StartOpts{NetNS: srv.NS, UID: sidecarUID, GID: sidecarUID, Name: "srv-sidecar"}, scArgs...)
	echo := startMstest(t, bin, testnet.StartOpts{NetNS: srv.NS, UID: appUID, GID: appUID, Name: "echo"}, "echo", "--port", fmt.Sprint(appPort))

	for _, tc := range []struct {
		name        string
		ip          netip.Addr
		passthrough netip.Addr
	}{
		{"IPv4", srv.IPv4, netip.MustParseAddr("127.0.0.6")},
		{"IPv6", srv.IPv6, netip.MustParseAddr("::6")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := netip.AddrPortFrom(tc.ip, appPort).String()
			r := runClient(t, bin, cli.NS, dst)
			if r.Str("remote") != dst {
				t.Errorf("client connected to %s, want %s", r.Str("remote"), dst)
			}

			out, err := cliSC.WaitEvent(5*time.Second, "accept", func(ev testnet.Event) bool { return ev.Str("peer") == r.Str("local") })
			if err != nil {
				t.Fatalf("client sidecar did not get the app's connection: %v", err)
			}
			if out.Str("listener") != "outbound" || out.Str("orig_dst") != dst {
				t.Errorf("client sidecar accept %v, want outbound with orig_dst %s", out, dst)
			}
			up, err := cliSC.WaitEvent(5*time.Second, "upstream", func(ev testnet.Event) bool { return ev.Int("id") == out.Int("id") })
			if err != nil {
				t.Fatal(err)
			}
			in, err := srvSC.WaitEvent(5*time.Second, "accept", func(ev testnet.Event) bool { return ev.Str("peer") == up.Str("local") })
			if err != nil {
				t.Fatalf("server sidecar did not get the client sidecar's connection: %v", err)
			}
			if in.Str("listener") != "inbound" || in.Str("orig_dst") != dst {
				t.Errorf("server sidecar accept %v, want inbound with orig_dst %s", in, dst)
			}
			inUp, err := srvSC.WaitEvent(5*time.Second, "upstream", func(ev testnet.Event) bool { return ev.Int("id") == in.Int("id") })
			if err != nil {
				t.Fatal(err)
			}
			src, err := netip.ParseAddrPort(inUp.Str("local"))
			if err != nil {
				t.Fatal(err)
			}
			// ::6 only works because Apply added it to lo, as
			// istio-iptables does; without it the sidecar would dial from
			// the pod address and Istio's rules would redirect its own
			// connection back to 15006.
			if src.Addr() != tc.passthrough {
				t.Errorf("server sidecar dialled the app from %s, want %s", src, tc.passthrough)
			}
			if _, err := echo.WaitEvent(5*time.Second, "accept", func(ev testnet.Event) bool { return ev.Str("peer") == inUp.Str("local") }); err != nil {
				t.Errorf("app did not get the server sidecar's connection: %v", err)
			}
			for _, p := range []*testnet.Proc{cliSC, srvSC} {
				id := out.Int("id")
				if p == srvSC {
					id = in.Int("id")
				}
				cl, err := p.WaitEvent(5*time.Second, "close", func(ev testnet.Event) bool { return ev.Int("id") == id })
				if err != nil {
					t.Fatal(err)
				}
				if cl.Int("bytes_up") != r.Int("bytes") || cl.Int("bytes_down") != r.Int("bytes") || cl.Str("error") != "" {
					t.Errorf("sidecar close %v, client exchanged %d bytes", cl, r.Int("bytes"))
				}
			}
		})
	}
	for _, p := range []*testnet.Proc{cliSC, srvSC} {
		for _, ev := range p.Events() {
			if s := ev.Str("event"); s == "error" || s == "warning" {
				t.Errorf("sidecar event %v", ev)
			}
		}
	}

	t.Run("cleanup", func(t *testing.T) {
		for _, pod := range []*testnet.Pod{cli, srv} {
			if err := cleanups[pod](); err != nil {
				t.Fatalf("cleanup in %s: %v", pod.Name, err)
			}
			for _, save := range []string{"iptables-save", "ip6tables-save"} {
				if out := pod.NS.Run(t, save); strings.Contains(out, "ISTIO_") {
					t.Errorf("%s in %s after cleanup:\n%s", save, pod.Name, out)
				}
			}
			// The nat tables did not exist before Apply: no base chain,
			// hence no nat hook forcing conntrack, may be left.
			if _, err := exec.LookPath("nft"); err == nil {
				if out := pod.NS.Run(t, "nft", "list", "ruleset"); strings.Contains(out, "hook") {
					t.Errorf("nft ruleset in %s after cleanup:\n%s", pod.Name, out)
				}
			}
			if out := pod.NS.Run(t, "ip", "-6", "addr", "show", "dev", "lo"); strings.Contains(out, "::6/128") {
				t.Errorf("::6 left on lo in %s:\n%s", pod.Name, out)
			}
		}
		// Nothing is captured any more: the client reaches the app directly.
		accepts := countEvents(cliSC, "accept") + countEvents(srvSC, "accept")
		for _, ip := range []netip.Addr{srv.IPv4, srv.IPv6} {
			r := runClient(t, bin, cli.NS, netip.AddrPortFrom(ip, appPort).String())
			if _, err := echo.WaitEvent(5*time.Second, "accept", func(ev testnet.Event) bool {
				p, err := netip.ParseAddrPort(ev.Str("peer"))
				return err == nil && ev.Str("peer") == r.Str("local") && (p.Addr() == cli.IPv4 || p.Addr() == cli.IPv6)
			}); err != nil {
				t.Errorf("app did not get the client's direct connection: %v", err)
			}
		}
		if n := countEvents(cliSC, "accept") + countEvents(srvSC, "accept"); n != accepts {
			t.Errorf("sidecars accepted %d connections after cleanup", n-accepts)
		}
	})
}

// TestApplyIPv4Only loads only the IPv4 rules, as Istio does in a pod whose
// first address is IPv4 without --dual-stack: ip6tables stays empty and lo
// gets no ::6.
func TestApplyIPv4Only(t *testing.T) {
	requireTools(t)
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pod := bn.AddPod(t, "v4")
	cleanup := apply(t, pod.NS, false)
	if out, n := natRules(t, pod.NS, "iptables-save"); n != 18 {
		t.Errorf("iptables-save shows %d nat rules, want 18:\n%s", n, out)
	}
	if out := pod.NS.Run(t, "ip6tables-save"); strings.Contains(out, "ISTIO_") {
		t.Errorf("ip6tables rules loaded without IPv6:\n%s", out)
	}
	if out := pod.NS.Run(t, "ip", "-6", "addr", "show", "dev", "lo"); strings.Contains(out, "::6/128") {
		t.Errorf("::6 added without IPv6:\n%s", out)
	}
	if err := cleanup(); err != nil {
		t.Fatal(err)
	}
	if out := pod.NS.Run(t, "iptables-save"); strings.Contains(out, "ISTIO_") {
		t.Errorf("iptables-save after cleanup:\n%s", out)
	}
}

// TestApplyTwice checks that a second Apply fails with ErrAlreadyApplied
// and leaves the first one's rules (and ::6) alone, and that the rules load
// into a namespace holding no address but loopback's: the rules need no
// pod address, only istio-iptables does, to decide about IPv6.
func TestApplyTwice(t *testing.T) {
	requireTools(t)
	ns := testnet.NewNetNS(t, "twice")
	apply(t, ns, true)
	if _, err := baseline.Apply(ns.Path(), baseline.Options{IPv6: true}); !errors.Is(err, baseline.ErrAlreadyApplied) {
		t.Fatalf("second Apply: %v, want ErrAlreadyApplied", err)
	}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		if out, n := natRules(t, ns, save); n != 18 {
			t.Errorf("%s after the failed second Apply shows %d nat rules, want 18:\n%s", save, n, out)
		}
	}
	if out := ns.Run(t, "ip", "-6", "addr", "show", "dev", "lo"); !strings.Contains(out, "::6/128") {
		t.Errorf("::6 removed by the failed second Apply:\n%s", out)
	}
}

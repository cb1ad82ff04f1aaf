package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// Issue 14, faults: the agent killed, upgraded, downgraded, refused and
// uninstalled while long-lived connections stream checksummed, numbered
// messages through sidecars. The figures each phase logs ("figure: ...")
// are in docs/reliability.md.

// faultStreams is how many long-lived connections each stream pair carries
// (two pairs: one spliced, one with splice disabled).
const faultStreams = 100

// faultPolicy lets only the client service account reach the servers: the
// rogue pod is denied by the kernel at connect.
const faultPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: servers, namespace: faults}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/faults/sa/client"]}}]
`

// streamPair is a client pod streaming to a server pod through both
// sidecars.
type streamPair struct {
	name           string
	spliced        bool
	client, server *meshPod
	stream         *testnet.Proc
	progressSeq    int64
}

// faultWorld is one node: two stream pairs (spliced with app-splice, and
// splice disabled), a rogue pod the policy denies, the agent process.
type faultWorld struct {
	t     *testing.T
	m     *mesh
	ag    *agentProc
	pairs []*streamPair
	rogue *meshPod
}

func newFaultWorld(t *testing.T) *faultWorld {
	t.Helper()
	m, configDir := agentWorld(t, "trustDomain: cluster.local\n")
	if err := os.WriteFile(filepath.Join(configDir, "policy.yaml"), []byte(faultPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	w := &faultWorld{t: t, m: m, ag: startAgent(t, m, configDir)}
	w.ag.withLogs() // for the next start: noErrorLogs reads the log
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pod := func(name, sa string, ann map[string]string) *meshPod {
		p := m.addPod(node, name, nil)
		_, err := w.ag.client.AddPod(context.Background(), api.PodRegistration{
			ContainerID: "c-" + name, Netns: p.NS.Path(), IfName: "eth0",
			IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: name, PodNamespace: "faults",
			ServiceAccount: sa, Labels: map[string]string{"app": sa}, Annotations: ann,
		})
		if err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
		p.Sidecar = m.start(p, name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
		return p
	}
	spliced := injected(istio.AnnotationAppSplice, "true")
	plain := injected(istio.AnnotationSplice, "disabled")
	w.pairs = []*streamPair{
		{name: "spliced", spliced: true, client: pod("client-s", "client", spliced), server: pod("server-s", "server", spliced)},
		{name: "not spliced", client: pod("client-n", "client", plain), server: pod("server-n", "server", plain)},
	}
	w.rogue = pod("rogue", "rogue", injected())
	eventually(t, "five sidecar listeners", func() bool { return w.counters()["listener_iter.listener_registered"] >= 5 })
	eventually(t, "the servers' policy in the kernel", func() bool {
		return w.tryConnect(w.rogue, w.pairs[0].server) != ""
	})
	return w
}

func (w *faultWorld) counters() datapath.Counters {
	w.t.Helper()
	c, err := datapath.ReadPinnedCounters(w.m.pin)
	if err != nil {
		w.t.Fatal(err)
	}
	return c
}

func (w *faultWorld) tryConnect(from, to *meshPod) string {
	return w.m.tryConnect(from, appUID, netip.AddrPortFrom(to.IPv4, appPort))
}

// startStreams opens every pair's long-lived connections and waits until
// each server sidecar accepted all of them and messages flow on them.
func (w *faultWorld) startStreams() {
	t := w.t
	t.Helper()
	for _, p := range w.pairs {
		p.stream = w.m.start(p.client, p.client.Name+"-streams", appUID, "client",
			"--target", netip.AddrPortFrom(p.server.IPv4, appPort).String(),
			"--pipelined", "--until-signal", "--conns", fmt.Sprint(faultStreams),
			"--messages", "100000000", "--size", "500", "--interval", "100ms", "--timeout", "30s")
	}
	for _, p := range w.pairs {
		waitUntil(t, p.name+" streams accepted by the server sidecar", 60*time.Second, func() bool {
			return len(acceptEvents(p.server.Sidecar, "inbound")) >= faultStreams
		})
	}
	w.flow("streams running", 10)
}

// progress asks every stream client how much it has verified so far.
func (w *faultWorld) progress() (messages, bytes, failed int64) {
	t := w.t
	t.Helper()
	for _, p := range w.pairs {
		p.progressSeq++
		seq := p.progressSeq
		if err := p.stream.Signal(syscall.SIGUSR2); err != nil {
			t.Fatalf("%s streams: %v", p.name, err)
		}
		ev, err := p.stream.WaitEvent(waitFor, "progress", func(ev testnet.Event) bool { return ev.Int("seq") == seq })
		if err != nil {
			t.Fatalf("%s streams progress: %v", p.name, err)
		}
		messages += ev.Int("messages")
		bytes += ev.Int("bytes")
		failed += ev.Int("failed")
	}
	return messages, bytes, failed
}

// flow waits until every connection verified about perConn more messages
// (at 10 messages a second each) and no connection failed.
func (w *faultWorld) flow(what string, perConn int64) (bytes int64) {
	t := w.t
	t.Helper()
	m0, b0, _ := w.progress()
	want := m0 + perConn*int64(faultStreams*len(w.pairs))
	var m, b, failed int64
	waitUntil(t, what, 60*time.Second, func() bool {
		m, b, failed = w.progress()
		if failed > 0 {
			t.Fatalf("%s: %d connections failed", what, failed)
		}
		return m >= want
	})
	return b - b0
}

// stopStreams ends the streams and fails the test unless every connection
// verified every message it sent and closed cleanly.
func (w *faultWorld) stopStreams() (messages, bytes int64) {
	t := w.t
	t.Helper()
	for _, p := range w.pairs {
		p.stream.Signal(syscall.SIGUSR1)
	}
	for _, p := range w.pairs {
		finishedOK(t, p.stream, p.name+" streams")
		n := 0
		for _, ev := range p.stream.Events() {
			switch ev.Str("event") {
			case "result":
				n++
				if !ev.Bool("ok") {
					t.Errorf("%s connection %d: %v", p.name, ev.Int("conn"), ev["errors"])
				}
				messages += ev.Int("messages")
				bytes += ev.Int("bytes")
			case "closed":
				if !ev.Bool("ok") {
					t.Errorf("%s connection %d did not close cleanly: %s", p.name, ev.Int("conn"), ev.Str("error"))
				}
			}
		}
		if n != faultStreams {
			t.Errorf("%s: %d results, want %d", p.name, n, faultStreams)
		}
	}
	for _, p := range w.pairs {
		sidecarErrors(t, p.client, p.server)
	}
	return messages, bytes
}

// probeNew checks with fresh connections and the kernel counters that
// capture, splice and policy work: each pair's new connection is captured
// at both ends (and spliced on the spliced pair, left to TCP on the other),
// the rogue pod is denied at connect.
func (w *faultWorld) probeNew(when string) {
	t := w.t
	t.Helper()
	for _, p := range w.pairs {
		before := w.counters()
		c := w.m.start(p.client, "probe", appUID, "client", "--target",
			netip.AddrPortFrom(p.server.IPv4, appPort).String(), "--messages", "20", "--size", "300")
		finishedOK(t, c, when+": new connection on the "+p.name+" pair")
		d := w.counters().Sub(before)
		wantInserted := uint64(0)
		if p.spliced {
			wantInserted = 6
		}
		if d["connect.captured"] != 1 || d["sk_lookup.captured"] != 1 || d["sockops.sock_inserted"] != wantInserted ||
			(!p.spliced && d["sockops.skip_splice_off"] == 0) || (p.spliced && d["sk_msg.redirected"] == 0) {
			t.Errorf("%s: new connection on the %s pair: %v", when, p.name, nonZero(d))
		}
	}
	before := w.counters()
	if got := w.tryConnect(w.rogue, w.pairs[0].server); !strings.Contains(got, "operation not permitted") {
		t.Errorf("%s: rogue -> server: %q, want EPERM", when, got)
	}
	if d := w.counters().Sub(before); d["policy.egress_denied"] != 1 {
		t.Errorf("%s: rogue -> server: %v", when, nonZero(d))
	}
}

// pinnedState is what the kernel holds for the datapath: its links (by
// pin name) and its maps (by name), with their IDs.
type pinnedState struct {
	links    map[string]datapath.LinkStatus
	maps     map[string]ebpf.MapID
	progTags map[string]string // program name -> tag
}

func readPinnedState(t *testing.T, pin string) pinnedState {
	t.Helper()
	st, err := datapath.Inspect(pin)
	if err != nil {
		t.Fatal(err)
	}
	ps := pinnedState{links: map[string]datapath.LinkStatus{}, maps: map[string]ebpf.MapID{}, progTags: map[string]string{}}
	for _, l := range st.Links {
		if l.Error != "" || !l.Attached {
			t.Fatalf("link %s: attached %v, %s", l.Name, l.Attached, l.Error)
		}
		ps.links[l.Name] = l
		p, err := ebpf.NewProgramFromID(ebpf.ProgramID(l.ProgramID))
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		ps.progTags[l.Program] = info.Tag
	}
	entries, err := os.ReadDir(filepath.Join(pin, "maps"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", e.Name()), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ps.maps[e.Name()] = id
	}
	return ps
}

// adopted fails the test unless after holds the very links and maps of
// before: the programs were replaced in place (link Update), nothing was
// detached or re-created. Tracing links (the splice(2) reader guard or
// detector) cannot be updated: by design a new one is attached before the
// old one goes (datapath.attachPinned), so only their presence is checked.
func (before pinnedState) adopted(t *testing.T, after pinnedState) {
	t.Helper()
	if len(after.links) != len(before.links) {
		t.Errorf("links: %d after, %d before", len(after.links), len(before.links))
	}
	for name, l := range before.links {
		a, ok := after.links[name]
		switch {
		case !ok:
			t.Errorf("link %s gone", name)
		case l.Type == "tracing" || l.Type == "raw_tracepoint":
		case a.LinkID != l.LinkID:
			t.Errorf("link %s: id %d before, %d after (re-attached)", name, l.LinkID, a.LinkID)
		}
	}
	if len(after.maps) != len(before.maps) {
		t.Errorf("maps: %d after, %d before", len(after.maps), len(before.maps))
	}
	for name, id := range before.maps {
		if after.maps[name] != id {
			t.Errorf("map %s: id %d before, %d after (re-created)", name, id, after.maps[name])
		}
	}
}

// noErrorLogs fails the test if the agent (started withLogs) logged an
// error.
func (a *agentProc) noErrorLogs(what string) {
	a.t.Helper()
	errs := slices.DeleteFunc(a.proc.Lines(), func(l string) bool { return !strings.Contains(l, `"level":"ERROR"`) })
	if len(errs) > 0 {
		a.t.Errorf("%s logged errors:\n%s", what, strings.Join(errs, "\n"))
	}
}

// TestUninstallDeliversQueuedBytes (issue 14 item 3): bytes already
// redirected into a spliced socket whose reader is not reading (the server
// app is stopped) when `meshsplice uninstall` runs are delivered, in order,
// whether the reader resumes during the drain wait or after uninstall
// returned; once the connection closed, the splice map is gone from the
// kernel.
func TestUninstallDeliversQueuedBytes(t *testing.T) {
	for _, tc := range []struct {
		name        string
		drain       string
		resumeAfter bool // resume the reader after uninstall returned
	}{
		{"reader resumes within the drain time", "20s", false},
		{"reader resumes after the drain time", "1s", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, client, server := newSplicedPair(t)
			bin := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice")
			if err := server.App.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			before := m.counters()
			const messages, size = 200, 1000
			c := m.start(client, "queued", appUID, "client", "--target", netip.AddrPortFrom(server.IPv4, appPort).String(),
				"--pipelined", "--messages", fmt.Sprint(messages), "--size", fmt.Sprint(size), "--timeout", "40s")
			// Client -> server crosses three spliced hops; the last one
			// ends in the stopped app's socket queue.
			waitUntil(t, "every byte queued in the server app's socket", 20*time.Second, func() bool {
				return m.counters().Sub(before)["sk_msg.bytes_redirected"] >= 3*messages*(size+headerLenE2E)
			})
			queued, _ := datapath.Inspect(m.pin)
			socks := readPinnedState(t, m.pin).maps["ms_socks"]
			m.dp.Close() // the agent is gone
			un := testnet.Start(t, testnet.StartOpts{Name: "uninstall", Args: []string{bin, "uninstall",
				"--pin-dir", m.pin, "--cgroup", m.cg.Path, "--drain", tc.drain}})
			if tc.resumeAfter {
				if err := un.WaitTimeout(30 * time.Second); err != nil {
					t.Fatalf("uninstall: %v", err)
				}
				// Unpinned and detached, the splice map still lives: the
				// live sockets' psocks hold the sk_msg program, which holds
				// the map. So the queue is not dropped.
				t.Logf("splice map %d alive after uninstall returned: %v", socks, mapAlive(socks))
			} else {
				waitUntil(t, "uninstall to detach", 10*time.Second, func() bool { return attachedCgroupPrograms(t, m.cg.Path) == 0 })
			}
			if err := server.App.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			finishedOK(t, c, "bytes queued at uninstall")
			if err := un.WaitTimeout(30 * time.Second); err != nil {
				t.Fatalf("uninstall: %v", err)
			}
			// Once the spliced connections closed nothing stays in the kernel.
			waitUntil(t, "the splice map to be freed", 10*time.Second, func() bool { return !mapAlive(socks) })
			t.Logf("figure: %d bytes queued in %d spliced sockets at uninstall, delivered in order", messages*(size+headerLenE2E), queued.SplicedSockets)
		})
	}
}

// headerLenE2E is mstest's message header length (e2e/mstest headerLen).
const headerLenE2E = 12

// mapAlive tells whether the kernel still has the map with that ID.
func mapAlive(id ebpf.MapID) bool {
	m, err := ebpf.NewMapFromID(id)
	if err == nil {
		m.Close()
	}
	return err == nil
}

// skLookupPrograms counts the sk_lookup programs on the pod's netns.
func skLookupPrograms(t *testing.T, p *meshPod) int {
	t.Helper()
	f, err := os.Open(p.NS.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachSkLookup})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

// buildAgentVariant builds meshsplice with the datapath variant of
// datapath/variant.go: "program" (every program changed, same maps) or
// "maps" (an incompatible map layout).
func buildAgentVariant(t *testing.T, variant string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "meshsplice-"+variant)
	cmd := exec.Command("go", "build", "-tags", "meshsplice_variant",
		"-ldflags", "-X github.com/meshsplice/meshsplice/datapath.variant="+variant,
		"-o", out, "github.com/meshsplice/meshsplice/cmd/meshsplice")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the %s variant: %v\n%s", variant, err, b)
	}
	return out
}

// runBinary makes the agent's command line run bin instead of the binary
// it ran so far.
func (a *agentProc) runBinary(bin string) {
	a.t.Helper()
	i := slices.Index(a.args, a.bin)
	if i < 0 {
		a.t.Fatalf("no %s on the agent's command line", a.bin)
	}
	a.args[i], a.bin = bin, bin
}

// TestFaultsUnderTraffic is issue 14 items 1-3, one after the other on
// one node while 200 long-lived connections (100 with every hop spliced,
// 100 with splice disabled) stream checksummed, numbered messages through
// sidecars; every connection lives through all of it:
//
//  1. the agent is SIGKILLed: while it is down new connections are
//     captured, spliced and denied by the kernel alone; the restarted agent
//     adopts the pinned links and maps;
//  2. it is replaced by a build whose every program differs (upgrade), then
//     by the first build again (downgrade): the links are updated in place,
//     the maps kept; a build whose map layout differs is refused with a
//     message naming the map and the way out, and touches nothing;
//  3. `meshsplice uninstall` (the agent stopped, as when its DaemonSet is
//     deleted): nothing stays attached or pinned, new connections are not
//     captured, live ones go on through their sidecars; then the build with
//     the other layout starts afresh (the way out of 2).
//
// At the end every connection must have verified every message it sent,
// in order, and closed cleanly, and no map or program of the uninstalled
// datapath may stay in the kernel.
func TestFaultsUnderTraffic(t *testing.T) {
	testnet.RequireRoot(t)
	v2 := buildAgentVariant(t, "program")
	v3 := buildAgentVariant(t, "maps")
	w := newFaultWorld(t)
	v1 := w.ag.bin
	w.startStreams()
	first := readPinnedState(t, w.m.pin)

	w.killAndRestart()
	up := w.replaceAgent("upgrade", v2)
	for prog, tag := range first.progTags {
		if up.progTags[prog] == tag {
			t.Errorf("upgrade: %s still runs the first build's program (tag %s)", prog, tag)
		}
	}
	down := w.replaceAgent("downgrade", v1)
	for prog, tag := range first.progTags {
		if down.progTags[prog] != tag {
			t.Errorf("downgrade: %s has tag %s, want the first build's %s", prog, down.progTags[prog], tag)
		}
	}
	w.refuseLayout(v3, down)
	w.uninstall()

	// The way out of a layout change: after uninstall the new build starts
	// afresh and takes its pods back from its state directory.
	w.ag.runBinary(v3)
	w.ag.start()
	eventually(t, "the policy back in the kernel", func() bool { return w.tryConnect(w.rogue, w.pairs[0].server) != "" })
	w.probeNew("after uninstall and the new layout")
	w.ag.noErrorLogs("the agent of the new layout")
	w.flow("streams after uninstall and the new layout", 3)

	msgs, bytes := w.stopStreams()
	t.Logf("figure: all faults: %d messages / %d bytes verified end to end in all, 0 errors", msgs, bytes)
	// The live connections held the uninstalled splice map (through their
	// sockets' sk_msg program); closed, they release it.
	waitUntil(t, "every map of the uninstalled datapath to be freed", 20*time.Second, func() bool {
		for _, id := range first.maps {
			if mapAlive(id) {
				return false
			}
		}
		return true
	})
	for _, st := range []pinnedState{first, up, down} {
		for _, l := range st.links {
			if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(l.ProgramID)); err == nil {
				p.Close()
				t.Errorf("program %s (%d) still in the kernel", l.Program, l.ProgramID)
			}
		}
	}
}

// killAndRestart is item 1: SIGKILL, the kernel alone, a restart.
func (w *faultWorld) killAndRestart() {
	t := w.t
	t.Helper()
	before := readPinnedState(t, w.m.pin)
	_, b0, _ := w.progress()
	killed := time.Now()
	if err := w.ag.proc.Kill(); err != nil {
		t.Fatal(err)
	}
	w.probeNew("agent down")
	down := w.flow("streams with the agent down", 10)
	if n := attachedCgroupPrograms(t, w.m.cg.Path); n != 4 {
		t.Errorf("programs on the cgroup with the agent down: %d, want 4", n)
	}
	restart := time.Now()
	w.ag.start()
	downFor, startup := time.Since(killed), time.Since(restart)
	_, b1, _ := w.progress()
	before.adopted(t, readPinnedState(t, w.m.pin))
	if n := attachedCgroupPrograms(t, w.m.cg.Path); n != 4 {
		t.Errorf("programs on the cgroup after the restart: %d, want 4", n)
	}
	if pods := agentPods(t, w.ag); len(pods) != 5 {
		t.Errorf("restarted agent has %d pods, want 5", len(pods))
	}
	w.probeNew("agent restarted")
	w.ag.noErrorLogs("the restarted agent")
	w.flow("streams after the restart", 3)
	t.Logf("figure: agent killed: down %v (kill to ready; the restart itself %v), %d bytes verified end to end meanwhile (%d while probing), 0 errors",
		downFor.Round(time.Millisecond), startup.Round(time.Millisecond), b1-b0, down)
}

// replaceAgent is item 2: the agent stops (SIGTERM) and bin starts on the
// same pins and state.
func (w *faultWorld) replaceAgent(what, bin string) pinnedState {
	t := w.t
	t.Helper()
	before := readPinnedState(t, w.m.pin)
	_, b0, _ := w.progress()
	start := time.Now()
	w.ag.stop()
	w.ag.runBinary(bin)
	w.ag.start()
	took := time.Since(start)
	_, b1, _ := w.progress()
	after := readPinnedState(t, w.m.pin)
	before.adopted(t, after)
	w.probeNew("after the " + what)
	w.ag.noErrorLogs("the agent after the " + what)
	w.flow("streams after the "+what, 3)
	t.Logf("figure: %s: agent replaced in %v (stop to ready), %d bytes verified end to end meanwhile, 0 errors", what, took.Round(time.Millisecond), b1-b0)
	return after
}

// refuseLayout is item 2's refusal: bin has another map layout.
func (w *faultWorld) refuseLayout(bin string, current pinnedState) {
	t := w.t
	t.Helper()
	w.ag.stop()
	refused := &agentProc{t: t, bin: w.ag.bin, args: slices.Clone(w.ag.args)}
	refused.runBinary(bin)
	refused.proc = testnet.Start(t, testnet.StartOpts{Args: refused.args, Name: "agent-maps"})
	if err := refused.proc.WaitTimeout(30 * time.Second); err == nil || refused.proc.ExitCode() <= 0 {
		t.Fatalf("agent with another map layout: exit %d (%v), want a refusal", refused.proc.ExitCode(), err)
	}
	for _, want := range []string{"ms_counters (MaxEntries", "meshsplice uninstall --pin-dir " + w.m.pin, "traffic keeps flowing"} {
		if !hasLine(refused.proc.Lines(), want) {
			t.Errorf("the refusal does not say %q:\n%s", want, strings.Join(refused.proc.Lines(), "\n"))
		}
	}
	untouched := readPinnedState(t, w.m.pin)
	current.adopted(t, untouched)
	for name, l := range current.links {
		if untouched.links[name].ProgramID != l.ProgramID {
			t.Errorf("the refused agent replaced %s's program", name)
		}
	}
	w.probeNew("after a refused agent")
	w.flow("streams after a refused agent", 3)
}

// uninstall is item 3, the agent stopped.
func (w *faultWorld) uninstall() {
	t := w.t
	t.Helper()
	_, b0, _ := w.progress()
	start := time.Now()
	out, err := exec.Command(w.ag.bin, "uninstall", "--pin-dir", w.m.pin, "--cgroup", w.m.cg.Path).CombinedOutput()
	took := time.Since(start)
	_, b1, _ := w.progress()
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	t.Logf("uninstall:\n%s", out)
	if n := attachedCgroupPrograms(t, w.m.cg.Path); n != 0 {
		t.Errorf("%d programs still on the cgroup", n)
	}
	for _, p := range []*meshPod{w.pairs[0].client, w.pairs[0].server, w.pairs[1].client, w.pairs[1].server, w.rogue} {
		if n := skLookupPrograms(t, p); n != 0 {
			t.Errorf("sk_lookup still attached to %s", p.Name)
		}
	}
	if _, err := os.Stat(w.m.pin); !os.IsNotExist(err) {
		t.Errorf("pin dir still there: %v", err)
	}
	// New connections go straight to the server app.
	for _, p := range w.pairs {
		seenApp, seenSidecar := len(acceptsOf(p.server.App)), len(acceptEvents(p.client.Sidecar, "outbound"))
		c := w.m.start(p.client, "probe", appUID, "client", "--target",
			netip.AddrPortFrom(p.server.IPv4, appPort).String(), "--messages", "20", "--size", "300")
		finishedOK(t, c, "new connection after uninstall on the "+p.name+" pair")
		waitAccepts(t, p.server.App, "", seenApp+1)
		if peers := acceptsOf(p.server.App); len(peers) != seenApp+1 || origDst(peers[seenApp]).Addr() != p.client.IPv4 {
			t.Errorf("%s: server app did not get the new connection straight from the client: %v", p.name, peers[seenApp:])
		}
		if n := len(acceptEvents(p.client.Sidecar, "outbound")); n != seenSidecar {
			t.Errorf("%s: the client sidecar captured %d new connections after uninstall", p.name, n-seenSidecar)
		}
	}
	w.flow("streams after uninstall", 3)
	t.Logf("figure: uninstall under traffic: took %v, %d bytes verified end to end meanwhile, 0 errors", took.Round(time.Millisecond), b1-b0)
}

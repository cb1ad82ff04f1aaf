package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// readerPorts are where startReaders puts one reader of each kind.
func readerPort(i int) uint16 { return uint16(8090 + i) }

var readerKinds = []string{"read", "recv", "recvmsg", "splice", "iocopy", "fionread"}

// startReaders starts one mstest reader of each kind in pod p.
func (m *mesh) startReaders(p *meshPod) map[string]*testnet.Proc {
	m.t.Helper()
	out := map[string]*testnet.Proc{}
	for i, kind := range readerKinds {
		r := m.start(p, "reader-"+kind, appUID, "reader", "--port", fmt.Sprint(readerPort(i)), "--read", kind)
		if _, err := r.WaitEvent(waitFor, "ready"); err != nil {
			m.t.Fatalf("reader %s: %v", kind, err)
		}
		out[kind] = r
	}
	return out
}

// send runs mstest send from p to target and returns its result event; it
// fails the test if the client did not finish within its own timeout.
func (m *mesh) send(p *meshPod, target netip.AddrPort, writer string, size int) testnet.Event {
	m.t.Helper()
	c := m.start(p, p.Name+"-send-"+writer, appUID, "send", "--target", target.String(),
		"--write", writer, "--bytes", fmt.Sprint(size), "--timeout", "20s")
	c.WaitTimeout(40 * time.Second)
	res, err := c.WaitEvent(time.Second, "result")
	if err != nil {
		m.t.Fatalf("send %s -> %s: no result (hung?): %v\n%s", writer, target, err, strings.Join(c.Lines(), "\n"))
	}
	return res
}

// readDone waits for a read_done event of r with an id above after (the
// reader numbers its connections) and returns the latest one.
func readDone(t *testing.T, r *testnet.Proc, after int64) testnet.Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var last testnet.Event
		for _, ev := range r.Events() {
			if ev.Str("event") == "read_done" && ev.Int("id") > after && (last == nil || ev.Int("id") > last.Int("id")) {
				last = ev
			}
		}
		if last != nil {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("no read_done event after connection %d: %v", after, r.Lines())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readerCase is one writer -> reader pairing of TestEveryReaderAndWriter.
type readerCase struct{ writer, reader string }

// readerCases: every reader with write(2), the two other writers with a
// read(2) and a splice(2) reader. The readers that splice come last: on a
// node without the guard the first of them turns splicing off for the pod.
func readerCases() []readerCase {
	var out []readerCase
	for _, k := range []string{"read", "recv", "recvmsg", "fionread"} {
		out = append(out, readerCase{"write", k})
	}
	out = append(out, readerCase{"sendfile", "read"}, readerCase{"splice", "read"})
	for _, k := range []string{"splice", "iocopy"} {
		out = append(out, readerCase{"write", k})
	}
	return append(out, readerCase{"sendfile", "splice"}, readerCase{"splice", "splice"})
}

// TestEveryReaderAndWriter: a checksummed 3 MiB stream from the client
// pod's app to the server pod's app, for every way of reading (read, recv,
// recvmsg, FIONREAD before each read, splice into a pipe, Go's io.Copy into
// a second TCP connection) and of writing (write, sendfile, splice from a
// pipe), in each splice mode, and with sidecars that copy with io.Copy
// (which splices, as some proxies do) on their spliced sockets. Every byte
// must arrive in order and nothing may hang (every step is bounded). The
// counters show the path each stream took.
//
// What a splice-style reader of a spliced socket gets depends on the node
// (datapath.Readers): with the BPF LSM guard its splice(2) fails with
// EINVAL and it reads with read(2) instead; without it (this project's test
// machine refuses trampoline programs) the detector resets that one
// connection, at once, and the pod's later connections stay TCP, so a
// retry works. Before either existed, those streams hung until the
// timeout.
func TestEveryReaderAndWriter(t *testing.T) {
	modes := []struct {
		name       string
		mode       spliceMode
		iocopy     bool // sidecars copy with io.Copy
		readerSock bool // the reader's own socket is spliced
	}{
		{"sidecar-only", spliceModes[0], false, false},
		{"app-splice", spliceModes[1], false, true},
		{"sidecar-only/iocopy-sidecars", spliceModes[0], true, false},
	}
	for _, mc := range modes {
		t.Run(mc.name, func(t *testing.T) {
			m := newMesh(t)
			guard, why := m.dp.Readers()
			t.Logf("splice readers on this node: %s (%s)", guard, why)
			if guard == datapath.ReadersUnprotected {
				t.Fatalf("neither the guard nor the detector loads: %s", why)
			}
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			var flags []string
			if mc.iocopy {
				flags = []string{"--iocopy"}
			}
			server := m.addPodWith(node, "server", mc.mode.annotations(), flags...)
			client := m.addPodWith(node, "client", mc.mode.annotations(), flags...)
			readers := m.startReaders(server)
			const size = 3<<20 + 17
			seen := map[string]int64{} // last connection id each reader reported
			resets := 0
			for _, tc := range readerCases() {
				i := slices.Index(readerKinds, tc.reader)
				target := netip.AddrPortFrom(server.IPv4, readerPort(i))
				splicer := tc.reader == "splice" || tc.reader == "iocopy"
				// A splice-style read of a spliced socket.
				meets := (mc.readerSock && splicer) || mc.iocopy
				before := m.counters()
				res := m.send(client, target, tc.writer, size)
				d := m.counters().Sub(before)
				var rd testnet.Event
				if res.Bool("ok") {
					rd = readDone(t, readers[tc.reader], seen[tc.reader])
					seen[tc.reader] = rd.Int("id")
				}
				t.Logf("%s -> %s: ok=%v redirected=%d B, tcp_after_fallback=%d B, splice_refused=%d, splice_unguarded=%d, reset=%d, skipped_sockets=%d; reader %v",
					tc.writer, tc.reader, res.Bool("ok"), d["sk_msg.bytes_redirected"], d["sk_msg.bytes_tcp_after_fallback"],
					d["readers.splice_refused"], d["readers.splice_unguarded"], d["readers.splice_reader_reset"],
					d["sockops.skip_splice_reader_pod"], rd)
				if strings.Contains(res.Str("error"), "timeout") {
					t.Fatalf("%s -> %s hung until its timeout: %v", tc.writer, tc.reader, res)
				}
				if !res.Bool("ok") && guard == datapath.ReadersDetected && meets && d["readers.splice_unguarded"] > 0 {
					// The detector's one reset (or a short stream, when the
					// FIN overtook it); the pod is TCP now.
					resets++
					before = m.counters()
					res = m.send(client, target, tc.writer, size)
					d = m.counters().Sub(before)
					if res.Bool("ok") {
						rd = readDone(t, readers[tc.reader], seen[tc.reader])
						seen[tc.reader] = rd.Int("id")
					}
					t.Logf("  retry after the reset: ok=%v redirected=%d B, skipped_sockets=%d", res.Bool("ok"),
						d["sk_msg.bytes_redirected"], d["sockops.skip_splice_reader_pod"])
					if d["sockops.skip_splice_reader_pod"] == 0 {
						t.Errorf("%s -> %s: the retry was spliced again", tc.writer, tc.reader)
					}
				}
				if !res.Bool("ok") {
					t.Errorf("%s -> %s: stream not delivered intact: %v", tc.writer, tc.reader, res)
					continue
				}
				if d["sk_msg.bytes_redirected"] == 0 && d["sockops.skip_splice_reader_pod"] == 0 {
					t.Errorf("%s -> %s: neither spliced nor kept TCP for a splice reader", tc.writer, tc.reader)
				}
				switch guard {
				case datapath.ReadersGuarded:
					if d["readers.splice_unguarded"] != 0 {
						t.Errorf("%s -> %s: the detector saw a splice read the guard let through", tc.writer, tc.reader)
					}
					if meets && d["readers.splice_refused"] == 0 {
						t.Errorf("%s -> %s: no splice read was refused", tc.writer, tc.reader)
					}
					if tc.reader == "splice" && rd.Bool("splice_einval") != mc.readerSock {
						t.Errorf("splice reader: splice_einval = %v", rd.Bool("splice_einval"))
					}
				case datapath.ReadersDetected:
					if !meets && d["readers.splice_unguarded"] != 0 {
						t.Errorf("%s -> %s: a splice read of a spliced socket where none should be", tc.writer, tc.reader)
					}
				}
				if !meets && d["readers.splice_refused"] != 0 {
					t.Errorf("%s -> %s: %d reads refused, want none", tc.writer, tc.reader, d["readers.splice_refused"])
				}
			}
			if guard == datapath.ReadersDetected && (mc.readerSock || mc.iocopy) && resets != 1 {
				t.Errorf("%d connections reset by the detector, want exactly 1 (then the pods stay TCP)", resets)
			}
			if !mc.iocopy && resets == 0 {
				sidecarErrors(t, client, server)
			}
		})
	}
}

// TestUnguardedSpliceReaderIsReset: without the BPF LSM guard (as on a
// kernel without BPF LSM), a splice(2) reader of a spliced socket would
// hang. The detector must see it, reset that connection (the writer gets an
// error, not a timeout), and the pod's next connections must stay TCP, so
// the same reader then works.
func TestUnguardedSpliceReaderIsReset(t *testing.T) {
	m := newMeshOpts(t, datapath.Options{NoSpliceGuard: true})
	if got, why := m.dp.Readers(); got != datapath.ReadersDetected {
		t.Logf("%s", why)
		t.Fatalf("readers mode %q, want %q", got, datapath.ReadersDetected)
	}
	if st, err := datapath.Inspect(m.pin); err != nil || st.Readers() != datapath.ReadersDetected {
		t.Fatalf("status says readers are %v (%v), want %s", st, err, datapath.ReadersDetected)
	}
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	ann := spliceModes[1].annotations()
	server := m.addPod(node, "server", ann)
	client := m.addPod(node, "client", ann)
	r := m.start(server, "reader-splice", appUID, "reader", "--port", "8093", "--read", "splice")
	if _, err := r.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(server.IPv4, 8093)
	before := m.counters()
	start := time.Now()
	res := m.send(client, target, "write", 1<<20)
	d := m.counters().Sub(before)
	t.Logf("first stream after %v: %v; counters %v", time.Since(start), res, nonZero(d))
	if res.Bool("ok") {
		t.Fatal("an unguarded splice reader read redirected data: the kernel has no trap any more, or nothing was spliced")
	}
	if strings.Contains(res.Str("error"), "timeout") {
		t.Errorf("the stuck connection was left to time out: %s", res.Str("error"))
	}
	if d["readers.splice_unguarded"] == 0 {
		t.Errorf("the detector did not see the splice reader: %v", nonZero(d))
	}
	// The agent resets the connection a few milliseconds later. If the
	// writer's FIN (which travels over TCP) reached the reader first,
	// splice(2) reported EOF with the stream still in the BPF queue: a
	// short stream, which the writer's check catches, and the reader
	// closes its end itself.
	rd := readDone(t, r, 0)
	if rd.Str("error") == "" {
		t.Logf("the reader saw EOF before the reset (FIN overtook the BPF queue): %v", rd)
	} else {
		eventually(t, "the detector's reset", func() bool {
			return m.counters().Sub(before)["readers.splice_reader_reset"] > 0
		})
	}
	pods, err := m.dp.SpliceReaderPods()
	if err != nil || pods[server.Cookie] == 0 {
		t.Errorf("server pod not marked as having a splice reader: %v %v", pods, err)
	}

	before = m.counters()
	res = m.send(client, target, "write", 1<<20)
	d = m.counters().Sub(before)
	if !res.Bool("ok") {
		t.Fatalf("second stream, with the pod's splicing off: %v", res)
	}
	if d["sockops.skip_splice_reader_pod"] == 0 {
		t.Errorf("second stream: no socket skipped for the splice reader's pod: %v", nonZero(d))
	}
	if d["readers.splice_unguarded"] != 0 {
		t.Errorf("second stream: the splice reader met a spliced socket again")
	}
}

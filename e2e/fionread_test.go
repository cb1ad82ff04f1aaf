package e2e

import (
	"net/netip"
	"testing"

	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestFionreadInEveryMix measures what ioctl(FIONREAD) tells a reader in
// every mix of paths its bytes can take, asking before each read(2) and
// comparing with what the read returned: "short" when FIONREAD announced
// fewer bytes than the read got, "zero" when it announced none. The reader
// never trusts it, so nothing hangs; the figures are logged and the kernel
// behaviour meshsplice documents (docs/readers.md) is asserted:
//   - a socket without a psock (TCP, or an app socket without app-splice):
//     never short;
//   - a spliced socket whose bytes all came redirected: never short;
//   - a spliced socket whose bytes came redirected, then over TCP after a
//     fallback (here: backpressure): FIONREAD counts only the BPF queue, so
//     once that is read it says 0 while TCP bytes wait;
//   - a spliced socket whose bytes all came over TCP (every send fell
//     back, here: drain): FIONREAD says 0 before every read.
func TestFionreadInEveryMix(t *testing.T) {
	cases := []struct {
		name      string
		mode      spliceMode
		pause     string // reader pauses: the writer meets backpressure
		drain     bool   // every send goes over TCP
		wantShort bool
	}{
		{"app-socket-not-spliced", spliceModes[0], "", false, false},
		{"all-redirected", spliceModes[1], "", false, false},
		{"redirected-then-tcp", spliceModes[1], "2s", false, true},
		{"all-tcp-on-a-spliced-socket", spliceModes[1], "", true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			server := m.addPod(node, "server", tc.mode.annotations())
			client := m.addPod(node, "client", tc.mode.annotations())
			args := []string{"reader", "--port", "8120", "--read", "fionread"}
			if tc.pause != "" {
				args = append(args, "--pause", tc.pause)
			}
			r := m.start(server, "fionread-reader", appUID, args...)
			if _, err := r.WaitEvent(waitFor, "ready"); err != nil {
				t.Fatal(err)
			}
			if tc.drain {
				if err := m.dp.SetNodeDrain(true); err != nil {
					t.Fatal(err)
				}
			}
			size := 1 << 20
			if tc.pause != "" {
				size = 16 << 20
			}
			before := m.counters()
			res := m.send(client, netip.AddrPortFrom(server.IPv4, 8120), "write", size)
			d := m.counters().Sub(before)
			if !res.Bool("ok") {
				t.Fatalf("stream not delivered intact: %v", res)
			}
			rd := readDone(t, r, 0)
			short, zero, reads := rd.Int("fionread_short"), rd.Int("fionread_zero"), rd.Int("reads")
			t.Logf("%s: %d reads, FIONREAD short before %d, zero before %d; redirected %d B, TCP after a fallback %d B, by design %d B",
				tc.name, reads, short, zero, d["sk_msg.bytes_redirected"], d["sk_msg.bytes_tcp_after_fallback"], d["sk_msg.bytes_tcp_by_design"])
			// Bytes may arrive between the ioctl and the read: a short
			// answer now and then is a race, not the kernel's mistake.
			if tc.wantShort && short == 0 || !tc.wantShort && short*10 > reads {
				t.Errorf("FIONREAD short before %d of %d reads, want short: %v", short, reads, tc.wantShort)
			}
		})
	}
}

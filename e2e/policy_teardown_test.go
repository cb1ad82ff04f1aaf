package e2e

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

// TestTeardownHalfClosedStreamsWithoutStorage (item 12): a connection
// whose client half-closed (FIN_WAIT2 on its side, CLOSE_WAIT on the
// server's, which keeps sending) between sockets that carry no meshsplice
// state (made by a process outside the datapath's cgroup: no sockops, no
// socket storage, direction unknown) is closed by a policy change that
// forbids it both ways, and left alone when only one direction forbids it
// (whichever it really is, the sidecar judging that direction might allow
// it).
func TestTeardownHalfClosedStreamsWithoutStorage(t *testing.T) {
	for _, tc := range []struct {
		name string
		// sets[i] is the policy set of pod i: allow only from identity 99
		// (nobody), or -1 for none.
		sets     [2]int
		tornDown bool
	}{
		{name: "both directions forbidden: closed", sets: [2]int{0, 0}, tornDown: true},
		{name: "only the client's policy forbids: kept", sets: [2]int{0, -1}, tornDown: false},
		{name: "only the server's policy forbids: kept", sets: [2]int{-1, 0}, tornDown: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t)
			if !m.dp.TeardownSupported() {
				t.Skip("this kernel has no bpf_sock_destroy (Linux >= 6.5)")
			}
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			tr, _, err := istio.ParseTraffic(injected(istio.AnnotationCapture, "disabled"), istio.DefaultDefaults())
			if err != nil {
				t.Fatal(err)
			}
			var pods [2]*testnet.Pod
			for i, name := range []string{"client", "server"} {
				p := node.AddPod(t, name)
				pods[i] = p
				cookie, err := p.NS.Cookie()
				if err != nil {
					t.Fatal(err)
				}
				if err := redirect.PreparePodNetns(p.NS.Path()); err != nil {
					t.Fatal(err)
				}
				if err := m.dp.AddPod(datapath.Pod{NetnsPath: p.NS.Path(), Cookie: cookie,
					IPs: []netip.Addr{p.IPv4, p.IPv6}, Traffic: tr, Identity: uint32(i + 1)}); err != nil {
					t.Fatal(err)
				}
			}
			client, server := halfClosedPair(t, pods[0], pods[1])

			pol := datapath.Policy{Sets: []datapath.PolicySet{allowFrom("nobody-but-99", 99)}, IPs: map[netip.Addr]datapath.IPPolicy{}}
			for i, p := range pods {
				pol.IPs[p.IPv4] = datapath.IPPolicy{Identity: uint32(i + 1), Set: tc.sets[i]}
			}
			if err := m.dp.SetPolicy(pol); err != nil {
				t.Fatal(err)
			}
			n, err := m.dp.TeardownForbidden()
			if err != nil {
				t.Fatal(err)
			}
			if got := n > 0; got != tc.tornDown {
				t.Fatalf("torn down %d sockets, want torn down: %v (counters %v)", n, tc.tornDown, nonZero(m.counters()))
			}
			// The server (CLOSE_WAIT) still sends; the client (FIN_WAIT2)
			// reads it only if the connection was kept.
			server.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, werr := server.Write([]byte("after"))
			client.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 5)
			_, rerr := io.ReadFull(client, buf)
			if tc.tornDown {
				if rerr == nil {
					t.Errorf("the client still reads from a torn down connection")
				}
				t.Logf("after teardown: server write %v, client read %v", werr, rerr)
				return
			}
			if werr != nil || rerr != nil || string(buf) != "after" {
				t.Errorf("kept connection: server write %v, client read %q %v", werr, buf, rerr)
			}
		})
	}
}

// halfClosedPair connects a client in pod a to a server in pod b, made by
// the test process (no cgroup: no meshsplice socket state), then
// half-closes the client: the client is in FIN_WAIT2, the server in
// CLOSE_WAIT and still able to send.
func halfClosedPair(t *testing.T, a, b *testnet.Pod) (client, server *net.TCPConn) {
	t.Helper()
	var ln *net.TCPListener
	if err := b.NS.Do(func() error {
		var err error
		ln, err = net.ListenTCP("tcp4", &net.TCPAddr{IP: b.IPv4.AsSlice(), Port: appPort})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := a.NS.Do(func() error {
		c, err := net.DialTCP("tcp4", nil, &net.TCPAddr{IP: b.IPv4.AsSlice(), Port: appPort})
		client = c
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	server, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("server read after the client's FIN: %v, want EOF", err)
	}
	// Data still flows server -> client.
	if _, err := server.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return client, server
}

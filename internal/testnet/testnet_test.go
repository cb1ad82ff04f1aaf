package testnet_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/internal/testnet"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if left := testnet.Leftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "testnet: leftovers after tests: %v\n", left)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// startEcho listens on [::]:port inside ns (dual-stack) and echoes every
// connection with an explicit read/write loop until the test ends.
func startEcho(t *testing.T, ns *testnet.NetNS, port int) {
	t.Helper()
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", ":"+strconv.Itoa(port))
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", ns, err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				buf := make([]byte, 32*1024)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
}

// dialEcho connects from inside ns to addr, sends a payload and checks that
// the same bytes come back. It returns the connection's local and remote
// addresses.
func dialEcho(t *testing.T, ns *testnet.NetNS, addr netip.AddrPort) (local, remote netip.AddrPort) {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr.String(), 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, ns, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	payload := bytes.Repeat([]byte("meshsplice-"), 10000)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		errc <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo from %s: %v", addr, err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write to %s: %v", addr, err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo from %s differs from what was sent", addr)
	}
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

func TestCgroup2Mount(t *testing.T) {
	mnt, err := testnet.Cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup2 mount: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("%s: filesystem type %#x, want cgroup2", mnt, st.Type)
	}
}

func TestNetNS(t *testing.T) {
	testnet.RequireRoot(t)
	a := testnet.NewNetNS(t, "a")
	b := testnet.NewNetNS(t, "b")
	if !strings.HasPrefix(a.Name(), "mstest-a-") || a.Path() != "/run/netns/"+a.Name() {
		t.Fatalf("unexpected name %q path %q", a.Name(), a.Path())
	}
	ca, err := a.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	ca2, err := a.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	cb, err := b.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	if ca != ca2 || ca == cb || ca == 0 {
		t.Fatalf("cookies: a=%d a again=%d b=%d", ca, ca2, cb)
	}
	// The test's own thread must be back in the original namespace.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	own, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	if own == ca || own == cb {
		t.Fatalf("test process netns cookie %d equals a namespace's", own)
	}
	if v, err := a.GetSysctl("net.ipv4.ip_forward"); err != nil || v != "0" {
		t.Fatalf("ip_forward in new netns = %q, %v", v, err)
	}
	if err := a.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	if v, err := a.GetSysctl("net.ipv4.ip_forward"); err != nil || v != "1" {
		t.Fatalf("ip_forward after set = %q, %v", v, err)
	}
	if v, _ := b.GetSysctl("net.ipv4.ip_forward"); v != "0" {
		t.Fatalf("sysctl leaked into another namespace: %q", v)
	}
	if out := a.Run(t, "ip", "-o", "link", "show", "lo"); !strings.Contains(out, "UP") {
		t.Fatalf("lo not up in %s: %s", a, out)
	}
	if err := a.Do(func() error { panic("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("Do with panic returned %v", err)
	}
}

func TestBridgeNetOneNode(t *testing.T) {
	testnet.RequireRoot(t)
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	a := bn.AddPod(t, "a")
	b := bn.AddPod(t, "b")
	x := bn.Subnet
	if a.IPv4 != netip.AddrFrom4([4]byte{10, byte(x), 0, 2}) || b.IPv4 != netip.AddrFrom4([4]byte{10, byte(x), 0, 3}) {
		t.Fatalf("unexpected IPv4 addresses %s %s", a.IPv4, b.IPv4)
	}
	if want := netip.MustParseAddr(fmt.Sprintf("fd00:%d::3", x)); b.IPv6 != want {
		t.Fatalf("pod b IPv6 %s, want %s", b.IPv6, want)
	}
	startEcho(t, a.NS, 7000)
	for _, ip := range []netip.Addr{a.IPv4, a.IPv6} {
		local, remote := dialEcho(t, b.NS, netip.AddrPortFrom(ip, 7000))
		if local.Addr() != ip.Unmap() && local.Addr().Unmap() != map[bool]netip.Addr{true: b.IPv4, false: b.IPv6}[ip.Is4()] {
			t.Errorf("dial %s: local address %s is not pod b's", ip, local)
		}
		if remote.Addr().Unmap() != ip {
			t.Errorf("dial %s: remote address %s", ip, remote)
		}
	}
	// The gateway (bridge) answers too, proving the default routes' next hop
	// is on-link.
	startEcho(t, bn.Node, 7001)
	dialEcho(t, a.NS, netip.AddrPortFrom(bn.GatewayV4, 7001))
	dialEcho(t, a.NS, netip.AddrPortFrom(bn.GatewayV6, 7001))
}

func TestBridgeNetTwoNodes(t *testing.T) {
	testnet.RequireRoot(t)
	na := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{Name: "na"})
	nb := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{Name: "nb"})
	if na.Subnet == nb.Subnet {
		t.Fatalf("random subnets collide: %d", na.Subnet)
	}
	testnet.ConnectNodes(t, na, nb)
	a1 := na.AddPod(t, "a1")
	b1 := nb.AddPod(t, "b1")
	startEcho(t, b1.NS, 8080)
	startEcho(t, a1.NS, 8080)
	for _, tc := range []struct {
		from *testnet.Pod
		to   netip.Addr
		want netip.Addr
	}{
		{a1, b1.IPv4, a1.IPv4},
		{a1, b1.IPv6, a1.IPv6},
		{b1, a1.IPv4, b1.IPv4},
		{b1, a1.IPv6, b1.IPv6},
	} {
		start := time.Now()
		local, _ := dialEcho(t, tc.from.NS, netip.AddrPortFrom(tc.to, 8080))
		t.Logf("%s -> %s: %v", tc.from.Name, tc.to, time.Since(start))
		// Routed, not NATed: the source is the pod's own address.
		if local.Addr().Unmap() != tc.want {
			t.Errorf("%s -> %s: local address %s, want %s", tc.from.Name, tc.to, local, tc.want)
		}
	}
}

func TestConnectNodesSameSubnet(t *testing.T) {
	testnet.RequireRoot(t)
	// Explicit equal subnets are allowed for unconnected nodes.
	n1 := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{Subnet: 42})
	n2 := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{Subnet: 42})
	p1 := n1.AddPod(t, "p")
	p2 := n2.AddPod(t, "p")
	if p1.IPv4 != p2.IPv4 {
		t.Fatalf("pods got %s and %s", p1.IPv4, p2.IPv4)
	}
}

func TestStart(t *testing.T) {
	testnet.RequireRoot(t)
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pod := bn.AddPod(t, "p")
	cg := testnet.NewCgroup(t)

	p := testnet.Start(t, testnet.StartOpts{
		NetNS:  pod.NS,
		Cgroup: cg,
		UID:    1337,
		GID:    1338,
		Args:   []string{"sh", "-c", `echo hello; echo '{"event":"ready","port":7}'; echo to-stderr >&2; exec sleep 60`},
	})
	if _, err := p.WaitLine(5*time.Second, func(l string) bool { return l == "hello" }); err != nil {
		t.Fatal(err)
	}
	ev, err := p.WaitEvent(5*time.Second, "ready")
	if err != nil {
		t.Fatal(err)
	}
	if ev.Int("port") != 7 {
		t.Fatalf("event %v", ev)
	}
	pid := p.PID()

	// Cgroup: the process is in it (and was born there: it never ran
	// elsewhere since nsenter execs without forking).
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "0::"+cg.RelPath()+"\n") {
		t.Fatalf("/proc/%d/cgroup does not name %s:\n%s", pid, cg.RelPath(), data)
	}
	procs, err := cg.Procs()
	if err != nil {
		t.Fatal(err)
	}
	if len(procs) != 1 || procs[0] != pid {
		t.Fatalf("cgroup.procs = %v, want [%d]", procs, pid)
	}
	if id, err := cg.ID(); err != nil || id == 0 {
		t.Fatalf("cgroup id %d, %v", id, err)
	}

	// Network namespace.
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		t.Fatal(err)
	}
	ino, err := pod.NS.Ino()
	if err != nil {
		t.Fatal(err)
	}
	if st.Ino != ino {
		t.Fatalf("process netns inode %d, pod netns inode %d", st.Ino, ino)
	}

	// Credentials.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Uid:\t1337\t1337\t1337\t1337\n", "Gid:\t1338\t1338\t1338\t1338\n"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("/proc/%d/status lacks %q:\n%s", pid, want, status)
		}
	}
	// nsenter --setgid clears the supplementary groups.
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "Groups:") && strings.TrimSpace(strings.TrimPrefix(line, "Groups:")) != "" {
			t.Errorf("supplementary groups not cleared: %q", line)
		}
	}

	// UID alone: gid 0 and, as with both set, no supplementary groups.
	q := testnet.Start(t, testnet.StartOpts{NetNS: pod.NS, UID: 1337, Args: []string{"sh", "-c", "id -u; id -g; grep ^Groups: /proc/self/status"}})
	if err := q.WaitTimeout(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(q.Lines(), ","); strings.TrimSpace(got) != "1337,0,Groups:" {
		t.Errorf("UID 1337 only: uid, gid, groups = %q", got)
	}

	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if p.ExitCode() != -1 {
		t.Fatalf("exit code after SIGKILL = %d", p.ExitCode())
	}
	if procs, _ := cg.Procs(); len(procs) != 0 {
		t.Fatalf("cgroup not empty after kill: %v", procs)
	}
}

func TestStartExitCodeAndNoNetNS(t *testing.T) {
	testnet.RequireRoot(t)
	p := testnet.Start(t, testnet.StartOpts{
		UID:  1337,
		Args: []string{"sh", "-c", `id -u; printf 'no newline'; exit 3`},
		Env:  []string{"MSTEST_X=1"},
	})
	err := p.WaitTimeout(10 * time.Second)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || p.ExitCode() != 3 {
		t.Fatalf("wait: %v, exit code %d", err, p.ExitCode())
	}
	if got := p.Lines(); len(got) != 2 || got[0] != "1337" || got[1] != "no newline" {
		t.Fatalf("lines %q", got)
	}
	if _, err := p.WaitLine(time.Second, func(string) bool { return false }); err == nil {
		t.Fatal("WaitLine on exited process without match returned nil error")
	}
}

// TestCgroupCleanupKills checks that a cgroup's cleanup kills processes left
// in it even when nobody else does.
func TestCgroupCleanupKills(t *testing.T) {
	testnet.RequireRoot(t)
	var cmd *exec.Cmd
	var path string
	t.Run("inner", func(t *testing.T) {
		cg := testnet.NewCgroup(t)
		path = cg.Path
		cmd = exec.Command("sleep", "300")
		cmd.SysProcAttr = cg.SysProcAttr()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
	})
	if cmd == nil || cmd.Process == nil {
		t.Fatal("inner test did not start the process")
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("sleep exited normally, want killed")
		}
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("process in cgroup survived its cleanup")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("cgroup %s still exists: %v", path, err)
	}
}

// TestNoLeftovers runs a full topology in a subtest and checks that its
// cleanup removed every namespace and cgroup it created.
func TestNoLeftovers(t *testing.T) {
	testnet.RequireRoot(t)
	var paths []string
	t.Run("topology", func(t *testing.T) {
		na := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
		nb := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
		testnet.ConnectNodes(t, na, nb)
		p := na.AddPod(t, "p")
		q := nb.AddPod(t, "q")
		cg := testnet.NewCgroup(t)
		testnet.Start(t, testnet.StartOpts{NetNS: p.NS, Cgroup: cg, Args: []string{"sleep", "60"}})
		paths = []string{na.Node.Path(), nb.Node.Path(), p.NS.Path(), q.NS.Path(), cg.Path}
	})
	for _, p := range paths {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after cleanup (%v)", p, err)
		}
	}
	if left := testnet.Leftovers(); len(left) > 0 {
		// Other tests of this package may run in parallel; only report
		// this subtest's resources above, the rest is checked in TestMain.
		t.Logf("resources of other tests still present: %v", left)
	}
}

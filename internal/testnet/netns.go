package testnet

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/meshsplice/meshsplice/internal/lab"
)

// NetNSDir is where named network namespaces are bind-mounted, as with
// "ip netns add".
const NetNSDir = lab.NetnsDir

// NetNS is a named network namespace bind-mounted at /run/netns/NAME.
type NetNS struct {
	ns *lab.Netns
}

// NewNetNS creates a named network namespace mstest-<prefix>-<random> under
// /run/netns, turns off IPv6 duplicate address detection in it (so IPv6
// addresses, link-local ones included, are usable at once) and brings its
// loopback interface up (lab.NewNamedNetns). Its cleanup unmounts and
// removes the namespace file; the namespace itself disappears once no process
// or socket uses it any more.
//
// Keep prefix short (a few characters): it ends up in the names of
// namespaces and, through pod names, of host-side links.
func NewNetNS(tb testing.TB, prefix string) *NetNS {
	tb.Helper()
	ns, err := lab.NewNamedNetns(Prefix + prefix + "-" + randomSuffix(6))
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	recordCreated(ns.Path)
	tb.Cleanup(func() {
		if err := lab.RemoveNetns(ns.Path); err != nil {
			tb.Errorf("testnet: %v", err)
		}
	})
	return &NetNS{ns: ns}
}

// Lab returns the namespace as package lab knows it.
func (ns *NetNS) Lab() *lab.Netns { return ns.ns }

// Name returns the namespace name, as shown by "ip netns list".
func (ns *NetNS) Name() string { return ns.ns.Name }

// Path returns the path of the namespace file, /run/netns/NAME. Open it to
// get a namespace descriptor (for setns or BPF netns attachments).
func (ns *NetNS) Path() string { return ns.ns.Path }

// String returns the namespace name.
func (ns *NetNS) String() string { return ns.ns.Name }

// Do runs fn on a goroutine locked to an OS thread that has entered the
// namespace, and returns fn's error. Sockets fn creates belong to the
// namespace and may be used from any goroutine afterwards; goroutines fn
// starts, however, run in the original namespace. fn must not call t.FailNow
// (t.Fatal); a panic in fn is returned as an error.
//
// The original namespace is restored afterwards; if that fails the thread is
// left locked so that the Go runtime terminates it instead of reusing a
// thread in the wrong namespace (see containernetworking/plugins pkg/ns).
func (ns *NetNS) Do(fn func() error) error {
	return ns.ns.Do(func() error { return callRecover(fn) })
}

func callRecover(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	return fn()
}

// Cookie returns the namespace's 64-bit netns cookie (the value
// bpf_get_netns_cookie returns for its sockets), read with
// getsockopt(SO_NETNS_COOKIE) on a socket created inside it.
func (ns *NetNS) Cookie() (uint64, error) { return ns.ns.Cookie() }

// Ino returns the inode number of the namespace (the number in
// "net:[NNN]" of /proc/PID/ns/net).
func (ns *NetNS) Ino() (uint64, error) { return ns.ns.Ino() }

// Sysctl sets a sysctl inside the namespace, e.g.
// Sysctl("net.ipv4.ip_forward", "1"). Keys use dots or slashes.
func (ns *NetNS) Sysctl(key, value string) error { return ns.ns.Sysctl(key, value) }

// GetSysctl reads a sysctl inside the namespace.
func (ns *NetNS) GetSysctl(key string) (string, error) { return ns.ns.GetSysctl(key) }

// Netlink returns a netlink handle operating inside the namespace. It is
// closed by the test's cleanup.
func (ns *NetNS) Netlink(tb testing.TB) *netlink.Handle {
	tb.Helper()
	h, err := ns.ns.Handle()
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	tb.Cleanup(h.Close)
	return h
}

// Run runs a command inside the namespace (through nsenter, which keeps the
// caller's /sys and cgroup mounts, unlike "ip netns exec") and returns its
// combined output. It fails the test when the command fails.
func (ns *NetNS) Run(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := exec.Command("nsenter", append([]string{"--net=" + ns.Path(), "--"}, args...)...).CombinedOutput()
	if err != nil {
		tb.Fatalf("testnet: netns %s: %s: %v\n%s", ns.Name(), strings.Join(args, " "), err, out)
	}
	return string(out)
}

package testnet

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/netnsutil"
)

// NetNSDir is where named network namespaces are bind-mounted, as with
// "ip netns add".
const NetNSDir = "/run/netns"

// NetNS is a named network namespace bind-mounted at /run/netns/NAME.
type NetNS struct {
	name string
	path string
}

// NewNetNS creates a named network namespace mstest-<prefix>-<random> under
// /run/netns, turns off IPv6 duplicate address detection in it (so IPv6
// addresses, link-local ones included, are usable at once) and brings its
// loopback interface up. Its cleanup unmounts and
// removes the namespace file; the namespace itself disappears once no process
// or socket uses it any more.
//
// Keep prefix short (a few characters): it ends up in the names of
// namespaces and, through pod names, of host-side links.
func NewNetNS(tb testing.TB, prefix string) *NetNS {
	tb.Helper()
	ns, err := createNetNS(prefix)
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	tb.Cleanup(func() {
		if err := ns.remove(); err != nil {
			tb.Errorf("testnet: %v", err)
		}
	})
	// Without DAD, link-local addresses of interfaces created later are
	// usable at once. With DAD they stay tentative for a second or two,
	// and a forwarding namespace sends no neighbour solicitation for
	// forwarded packets until the egress interface has a non-tentative
	// link-local address: the first routed IPv6 packets would be dropped.
	for _, key := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := ns.Sysctl(key, "0"); err != nil {
			tb.Fatalf("testnet: %v", err)
		}
	}
	h := ns.Netlink(tb)
	lo, err := h.LinkByName("lo")
	if err != nil {
		tb.Fatalf("testnet: netns %s: find lo: %v", ns.name, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		tb.Fatalf("testnet: netns %s: set lo up: %v", ns.name, err)
	}
	return ns
}

// Name returns the namespace name, as shown by "ip netns list".
func (ns *NetNS) Name() string { return ns.name }

// Path returns the path of the namespace file, /run/netns/NAME. Open it to
// get a namespace descriptor (for setns or BPF netns attachments).
func (ns *NetNS) Path() string { return ns.path }

// String returns the namespace name.
func (ns *NetNS) String() string { return ns.name }

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
	return netnsutil.Do(ns.path, func() error { return callRecover(fn) })
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
func (ns *NetNS) Cookie() (uint64, error) {
	var cookie uint64
	err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("getsockopt SO_NETNS_COOKIE: %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("netns %s cookie: %w", ns.name, err)
	}
	return cookie, nil
}

// Ino returns the inode number of the namespace (the number in
// "net:[NNN]" of /proc/PID/ns/net).
func (ns *NetNS) Ino() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(ns.path, &st); err != nil {
		return 0, fmt.Errorf("stat netns %s: %w", ns.name, err)
	}
	return st.Ino, nil
}

// Sysctl sets a sysctl inside the namespace, e.g.
// Sysctl("net.ipv4.ip_forward", "1"). Keys use dots or slashes.
func (ns *NetNS) Sysctl(key, value string) error {
	p := sysctlPath(key)
	err := ns.Do(func() error {
		return os.WriteFile(p, []byte(value), 0)
	})
	if err != nil {
		return fmt.Errorf("netns %s: set sysctl %s=%s: %w", ns.name, key, value, err)
	}
	return nil
}

// GetSysctl reads a sysctl inside the namespace.
func (ns *NetNS) GetSysctl(key string) (string, error) {
	var v []byte
	err := ns.Do(func() (err error) {
		v, err = os.ReadFile(sysctlPath(key))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("netns %s: read sysctl %s: %w", ns.name, key, err)
	}
	return strings.TrimSpace(string(v)), nil
}

func sysctlPath(key string) string {
	return filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
}

// Netlink returns a netlink handle operating inside the namespace. It is
// closed by the test's cleanup.
func (ns *NetNS) Netlink(tb testing.TB) *netlink.Handle {
	tb.Helper()
	h, err := ns.netlink()
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	tb.Cleanup(h.Close)
	return h
}

func (ns *NetNS) netlink() (*netlink.Handle, error) {
	target, err := netns.GetFromPath(ns.path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", ns.name, err)
	}
	defer target.Close()
	h, err := netlink.NewHandleAt(target)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in netns %s: %w", ns.name, err)
	}
	return h, nil
}

// Run runs a command inside the namespace (through nsenter, which keeps the
// caller's /sys and cgroup mounts, unlike "ip netns exec") and returns its
// combined output. It fails the test when the command fails.
func (ns *NetNS) Run(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := exec.Command("nsenter", append([]string{"--net=" + ns.path, "--"}, args...)...).CombinedOutput()
	if err != nil {
		tb.Fatalf("testnet: netns %s: %s: %v\n%s", ns.name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func createNetNS(prefix string) (*NetNS, error) {
	name := Prefix + prefix + "-" + randomSuffix(6)
	ns, err := lab.CreateNetns(name)
	if err != nil {
		return nil, err
	}
	recordCreated(ns.Path)
	return &NetNS{name: ns.Name, path: ns.Path}, nil
}

func (ns *NetNS) remove() error { return lab.RemoveNetns(ns.path) }

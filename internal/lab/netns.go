package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/netnsutil"
)

// NetnsDir is where named network namespaces are bind-mounted, as with
// "ip netns add".
const NetnsDir = "/run/netns"

// Netns is a named network namespace bind-mounted at /run/netns/NAME.
type Netns struct {
	// Name is the namespace name, as "ip netns list" shows it.
	Name string
	// Path is /run/netns/NAME: nsenter --net=PATH, setns, BPF netns links.
	Path string
}

// NewNetns creates the namespace <Prefix>-<name> (see NewNamedNetns) and
// registers its removal.
func (l *Lab) NewNetns(name string) (*Netns, error) {
	ns, err := NewNamedNetns(l.Name(name))
	if err != nil {
		return nil, err
	}
	l.Defer("remove netns "+ns.Name, func() error { return RemoveNetns(ns.Path) })
	return ns, nil
}

// NewNamedNetns creates the namespace name (CreateNetns), turns IPv6
// duplicate address detection off and brings its loopback up. Without
// DAD, addresses (link-local ones of interfaces created later included)
// are usable at once; with it they stay tentative for a second or two, and
// a forwarding namespace sends no neighbour solicitation for forwarded
// packets until the egress interface has a non-tentative link-local
// address: the first routed IPv6 packets would be dropped. RemoveNetns
// undoes it; the namespace itself goes away once no process and no socket
// uses it any more.
func NewNamedNetns(name string) (*Netns, error) {
	ns, err := CreateNetns(name)
	if err != nil {
		return nil, err
	}
	if err := ns.configure(); err != nil {
		RemoveNetns(ns.Path)
		return nil, err
	}
	return ns, nil
}

func (ns *Netns) configure() error {
	for _, key := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := ns.Sysctl(key, "0"); err != nil {
			return err
		}
	}
	err := ns.Netlink(func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("find lo: %w", err)
		}
		return h.LinkSetUp(lo)
	})
	if err != nil {
		return fmt.Errorf("netns %s: set lo up: %w", ns.Name, err)
	}
	return nil
}

var netnsDirMu sync.Mutex

// prepareNetnsDir creates /run/netns and makes it a shared mount point, as
// iproute2 does, so that namespace mounts propagate between mount
// namespaces.
func prepareNetnsDir() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", NetnsDir, err)
	}
	madeMount := false
	for {
		err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || madeMount {
			return fmt.Errorf("make %s a shared mount: %w", NetnsDir, err)
		}
		if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s onto itself: %w", NetnsDir, err)
		}
		madeMount = true
	}
}

// CreateNetns creates the named network namespace NAME bind-mounted at
// /run/netns/NAME, as "ip netns add" does, and nothing more (see NewNetns).
func CreateNetns(name string) (*Netns, error) {
	if err := prepareNetnsDir(); err != nil {
		return nil, err
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0)
	if err != nil {
		return nil, fmt.Errorf("create netns file: %w", err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: after unshare the thread lives in the new
		// namespace, and the runtime ends it with this goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount netns: %w", err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	return &Netns{Name: name, Path: path}, nil
}

// RemoveNetns unmounts and removes a namespace file made by CreateNetns;
// the namespace goes away once nothing uses it any more.
func RemoveNetns(path string) error {
	var errs []error
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove %s: %w", path, err))
	}
	return errors.Join(errs...)
}

// Do runs fn on an OS thread that entered the namespace. Sockets fn creates
// belong to the namespace; goroutines it starts do not run there. If the
// thread cannot return to its namespace it is left locked, so the Go
// runtime ends it rather than reuse it (containernetworking/plugins pkg/ns).
func (ns *Netns) Do(fn func() error) error { return netnsutil.Do(ns.Path, fn) }

// Sysctl sets a sysctl of the namespace, e.g. net.ipv4.ip_forward. Keys
// use dots or slashes.
func (ns *Netns) Sysctl(key, value string) error {
	p := sysctlPath(key)
	if err := ns.Do(func() error { return os.WriteFile(p, []byte(value), 0) }); err != nil {
		return fmt.Errorf("netns %s: sysctl %s=%s: %w", ns.Name, key, value, err)
	}
	return nil
}

// GetSysctl reads a sysctl of the namespace.
func (ns *Netns) GetSysctl(key string) (string, error) {
	var v []byte
	err := ns.Do(func() (err error) {
		v, err = os.ReadFile(sysctlPath(key))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("netns %s: read sysctl %s: %w", ns.Name, key, err)
	}
	return strings.TrimSpace(string(v)), nil
}

func sysctlPath(key string) string {
	return filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
}

// Cookie returns the namespace's netns cookie (what bpf_get_netns_cookie
// returns for its sockets), read with getsockopt(SO_NETNS_COOKIE) on a
// socket made inside it.
func (ns *Netns) Cookie() (uint64, error) {
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
		return 0, fmt.Errorf("netns %s cookie: %w", ns.Name, err)
	}
	return cookie, nil
}

// Ino returns the namespace's inode number (NNN in "net:[NNN]" of
// /proc/PID/ns/net).
func (ns *Netns) Ino() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(ns.Path, &st); err != nil {
		return 0, fmt.Errorf("stat netns %s: %w", ns.Name, err)
	}
	return st.Ino, nil
}

// Netlink runs fn with a netlink handle operating inside the namespace.
func (ns *Netns) Netlink(fn func(h *netlink.Handle) error) error {
	h, err := ns.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	return fn(h)
}

// Handle returns a netlink handle operating inside the namespace; the
// caller closes it.
func (ns *Netns) Handle() (*netlink.Handle, error) {
	target, err := netns.GetFromPath(ns.Path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", ns.Name, err)
	}
	defer target.Close()
	h, err := netlink.NewHandleAt(target)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in netns %s: %w", ns.Name, err)
	}
	return h, nil
}

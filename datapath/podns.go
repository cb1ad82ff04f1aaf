package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/netnsutil"
)

// ErrNetnsMismatch is returned when a pod's netns path names another
// namespace than the cookie it was registered with: the path was reused
// (/proc/PID/ns/net of a new process, a re-created /run/netns name) and
// acting there would act on another pod.
var ErrNetnsMismatch = errors.New("netns path names another namespace than the pod's cookie")

// NetnsCookie returns the cookie of the network namespace at path, the same
// value bpf_get_netns_cookie() gives inside it.
func NetnsCookie(path string) (uint64, error) {
	var cookie uint64
	err := netnsutil.Do(path, func() error {
		var err error
		cookie, err = ownNetnsCookie()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("netns cookie of %s: %w", path, err)
	}
	return cookie, nil
}

// ownNetnsCookie is the cookie of the calling thread's network namespace.
func ownNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
}

// doInPod runs fn inside the pod's network namespace, entered by path, once
// it has checked that the namespace entered is the one with the pod's
// cookie. Every use of a pod's path goes through here or openPodNetns.
func doInPod(cookie uint64, path string, fn func() error) error {
	return netnsutil.Do(path, func() error {
		got, err := ownNetnsCookie()
		if err != nil {
			return fmt.Errorf("netns cookie of %s: %w", path, err)
		}
		if got != cookie {
			return fmt.Errorf("%w: %s is netns %d, the pod's is %d", ErrNetnsMismatch, path, got, cookie)
		}
		return fn()
	})
}

// openPodNetns opens the pod's network namespace at path and checks its
// cookie on the opened file itself, so what the caller attaches to is the
// namespace checked, even if the path changes meanwhile.
func openPodNetns(cookie uint64, path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open netns: %w", err)
	}
	err = doInPod(cookie, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), func() error { return nil })
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// NetnsGone reports whether a pod's namespace is gone: its path no longer
// exists, is no namespace any more, or names another namespace than the
// cookie. Other errors (no permission, ...) are returned: nothing is known
// then, and the pod must be kept.
func NetnsGone(cookie uint64, path string) (bool, error) {
	err := doInPod(cookie, path, func() error { return nil })
	switch {
	case err == nil:
		return false, nil
	case errors.Is(err, os.ErrNotExist), errors.Is(err, unix.EINVAL), errors.Is(err, ErrNetnsMismatch):
		return true, nil
	}
	return false, err
}

// NetnsHolds reports whether ip is configured on an interface of the pod's
// namespace: who really owns an address two registrations claim.
func NetnsHolds(cookie uint64, path string, ip netip.Addr) (bool, error) {
	var held bool
	err := doInPod(cookie, path, func() error {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list addresses: %w", err)
		}
		for _, a := range addrs {
			if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == ip.Unmap() {
				held = true
			}
		}
		return nil
	})
	return held, err
}

package redirect

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// PassthroughV6 is the source Envoy's inbound passthrough cluster binds for
// IPv6 (127.0.0.6 for IPv4 needs nothing: all of 127/8 is local).
var PassthroughV6 = net.ParseIP("::6")

// PreparePodNetns does the one piece of pod network set-up that inbound
// capture needs, as istio-iptables does for IPv6: it adds ::6/128 to the
// pod's lo so the sidecar can connect to the app from ::6, the source that
// inbound capture lets through (without it the sidecar's connection to the
// app would be captured again, a loop). Idempotent.
func PreparePodNetns(path string) error {
	_, err := AddPassthroughV6(path)
	return err
}

// AddPassthroughV6 is PreparePodNetns that also tells whether it added
// ::6/128 (false: it was there already, or IPv6 is off in the pod), so
// that the pod's teardown removes only what its set-up added
// (RemovePassthroughV6).
func AddPassthroughV6(path string) (added bool, err error) {
	err = onLoopback(path, func(h *netlink.Handle, lo netlink.Link, addr *netlink.Addr) error {
		err := h.AddrAdd(lo, addr)
		switch {
		case err == nil:
			added = true
		case errors.Is(err, os.ErrExist) || errors.Is(err, unix.EEXIST):
		case errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EACCES):
			// IPv6 disabled in the pod: nothing to prepare.
		default:
			return fmt.Errorf("add ::6 to lo in %s: %w", path, err)
		}
		return nil
	})
	return added, err
}

// RemovePassthroughV6 removes ::6/128 from the pod's lo. A namespace or an
// address that is gone already is not an error.
func RemovePassthroughV6(path string) error {
	err := onLoopback(path, func(h *netlink.Handle, lo netlink.Link, addr *netlink.Addr) error {
		if err := h.AddrDel(lo, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove ::6 from lo in %s: %w", path, err)
		}
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// onLoopback runs fn with a netlink handle in the netns at path, its lo and
// the ::6/128 address.
func onLoopback(path string, fn func(h *netlink.Handle, lo netlink.Link, addr *netlink.Addr) error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", path, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo in %s: %w", path, err)
	}
	return fn(h, lo, &netlink.Addr{
		IPNet: &net.IPNet{IP: PassthroughV6, Mask: net.CIDRMask(128, 128)},
		Flags: unix.IFA_F_NODAD,
	})
}

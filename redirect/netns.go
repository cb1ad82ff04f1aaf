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
	addr := &netlink.Addr{
		IPNet: &net.IPNet{IP: PassthroughV6, Mask: net.CIDRMask(128, 128)},
		Flags: unix.IFA_F_NODAD,
	}
	if err := h.AddrAdd(lo, addr); err != nil && !errors.Is(err, os.ErrExist) && !errors.Is(err, unix.EEXIST) {
		if errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.EACCES) {
			// IPv6 disabled in the pod: nothing to prepare.
			return nil
		}
		return fmt.Errorf("add ::6 to lo in %s: %w", path, err)
	}
	return nil
}

package istio

import (
	"net/netip"
	"slices"
)

// Reason says why a connection is or is not sent to the sidecar. The values
// are stable: they name counters and appear in test output.
type Reason string

const (
	ReasonCaptured       Reason = "captured"        // sent to the sidecar
	ReasonNotMeshed      Reason = "not-meshed"      // Traffic.Capture is false
	ReasonInvalidAddress Reason = "invalid-address" // zero netip.Addr: never captured

	// Outbound.
	ReasonProxyUID      Reason = "proxy-uid"      // the proxy's own connection (uid)
	ReasonProxyGID      Reason = "proxy-gid"      // the proxy's own connection (gid)
	ReasonLoopback      Reason = "loopback"       // loopback destination (or source, inbound)
	ReasonExcludedPort  Reason = "excluded-port"  // excludeOutboundPorts
	ReasonExcludedRange Reason = "excluded-range" // excludeOutboundIPRanges
	ReasonNotIncluded   Reason = "not-included"   // neither includeOutboundPorts nor includeOutboundIPRanges

	// Outbound, to the inbound port.
	ReasonProxyHairpin Reason = "proxy-hairpin" // the proxy's own connection to a lo address (the pod's IPs): to the inbound port

	// Both.
	ReasonIPv6NotCaptured Reason = "ipv6-not-captured" // istio-iptables writes no ip6tables rules for this pod

	// Inbound.
	ReasonInboundPassthroughSource Reason = "inbound-passthrough-source" // from 127.0.0.6 or ::6 (Envoy) over lo
	ReasonMartian                  Reason = "martian"                    // a source that cannot arrive from outside: the kernel drops it
	ReasonProxyPort                Reason = "proxy-port"                 // to one of the sidecar's own ports
	ReasonExcludedInboundPort      Reason = "excluded-inbound-port"      // excludeInboundPorts
	ReasonNotIncludedPort          Reason = "not-included-port"          // not in includeInboundPorts
)

// Permalink for the rule references below.
//
// istio-iptables: https://github.com/istio/istio/blob/86c9f01fd735fb01d8192f5bcaf0d424afb7f14c/tools/istio-iptables/pkg/capture/run.go
// Its output for the injector's defaults: baseline/testdata/istio-sidecar-v{4,6}.golden.

var (
	loopback4    = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	passthrough4 = netip.AddrFrom4([4]byte{127, 0, 0, 6})
	passthrough6 = netip.AddrFrom16([16]byte{15: 6}) // ::6
)

// tunnelPort is istio-iptables' InboundTunnelPort: the proxy's own
// connections to it over lo are never sent to the inbound port.
const tunnelPort = 15008

// canon returns a as the datapath sees it: v4-mapped addresses as IPv4,
// without an IPv6 zone.
func canon(a netip.Addr) netip.Addr { return a.Unmap().WithZone("") }

// Target is where istio-iptables' nat rules send a TCP connection.
type Target uint8

const (
	TargetNone     Target = iota // not redirected: it reaches its destination
	TargetOutbound               // the sidecar's outbound port (15001)
	TargetInbound                // the sidecar's inbound port (15006)
)

func (t Target) String() string {
	switch t {
	case TargetOutbound:
		return "outbound"
	case TargetInbound:
		return "inbound"
	}
	return "none"
}

// Conn is one TCP connection attempt, as istio-iptables' nat rules see it.
type Conn struct {
	// Local: made by a process of the pod (nat OUTPUT, where the owner
	// match sees the process); otherwise it arrived from outside the pod
	// (nat PREROUTING).
	Local bool
	// Src is the source address. For a Local connection, the address the
	// socket was bound to (the zero Addr if none: the kernel then picks one
	// that is never 127.0.0.6 or ::6).
	Src netip.Addr
	Dst netip.AddrPort
	// UID and GID: the connecting process's (file system) uid and gid
	// (Local only).
	UID, GID uint32
}

// CaptureIPv6 says whether istio-iptables captures this pod's IPv6 at all.
// It writes ip6tables rules only when ENABLE_INBOUND_IPV6 comes out true,
// which it derives from the pod's addresses (tools/common/config/config.go,
// getLocalIP): without ISTIO_DUAL_STACK, when the first address that is not
// loopback or link-local is IPv6 (interfaces list IPv4 addresses before
// IPv6 ones, so: when the pod has no such IPv4 address); with it, when the
// pod has any such IPv6 address. Otherwise a pod's IPv6 connections, in and
// out, are never captured. Without PodIPs this returns true.
func (t Traffic) CaptureIPv6() bool {
	if len(t.PodIPs) == 0 {
		return true
	}
	has4, has6 := false, false
	for _, ip := range t.PodIPs {
		ip = canon(ip)
		if !ip.IsValid() || ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
			continue
		}
		if ip.Is4() {
			has4 = true
		} else {
			has6 = true
		}
	}
	return has6 && (t.DualStack || !has4)
}

// isPodIP: ip is one of the pod's own addresses.
func (t Traffic) isPodIP(ip netip.Addr) bool {
	for _, a := range t.PodIPs {
		if canon(a) == ip {
			return true
		}
	}
	return false
}

// CaptureOutbound says whether a TCP connect() from the pod to dst, made by
// a process with (file system) uid and gid and not bound to a source
// address, is sent to the sidecar's outbound port, and why: Decide for a
// Local connection. The proxy's own connections to the pod's addresses go to
// the inbound port instead (false, proxy-hairpin).
func (t Traffic) CaptureOutbound(dst netip.AddrPort, uid, gid uint32) (bool, Reason) {
	to, why := t.Decide(Conn{Local: true, Dst: dst, UID: uid, GID: gid})
	return to == TargetOutbound, why
}

// CaptureInbound says whether a TCP connection from src outside the pod to
// the pod's dst is handed to the sidecar's inbound port, and why: Decide
// for a connection that is not Local.
func (t Traffic) CaptureInbound(dst netip.AddrPort, src netip.Addr) (bool, Reason) {
	to, why := t.Decide(Conn{Src: src, Dst: dst})
	return to == TargetInbound, why
}

// Decide says where istio-iptables' nat rules send connection c, and why.
// See the package documentation for the rules.
func (t Traffic) Decide(c Conn) (Target, Reason) {
	if !t.Capture {
		return TargetNone, ReasonNotMeshed
	}
	if c.Local {
		return t.output(c)
	}
	return t.prerouting(c)
}

// output is the ISTIO_OUTPUT chain (run.go#L279-L409), rule by rule:
//
//	-p tcp --dport EXCLUDED -j RETURN                        (excludeOutboundPorts)
//	-o lo -s 127.0.0.6/32 -j RETURN                          (::6/128 in ip6tables)
//	-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
//	-o lo -m owner ! --uid-owner 1337 -j RETURN              (absent when an include range is loopback)
//	-m owner --uid-owner 1337 -j RETURN
//	(the same three for --gid-owner)
//	-d 127.0.0.1/32 -j RETURN                                (::1/128)
//	-d EXCLUDED_RANGE -j RETURN, includeOutboundPorts, includeOutboundIPRanges
//
// "-o lo" holds for loopback destinations and the pod's own addresses
// (routed through the local table). connect() to 0.0.0.0 or :: goes to
// 127.0.0.1 or ::1.
func (t Traffic) output(c Conn) (Target, Reason) {
	ip := canon(c.Dst.Addr())
	if !ip.IsValid() {
		return TargetNone, ReasonInvalidAddress
	}
	if ip.Is6() && !t.CaptureIPv6() {
		return TargetNone, ReasonIPv6NotCaptured
	}
	if ip.IsUnspecified() {
		ip = loopback4
		if c.Dst.Addr().Is6() && !c.Dst.Addr().Is4In6() {
			ip = netip.IPv6Loopback()
		}
	}
	port := c.Dst.Port()
	viaLo := ip.IsLoopback() || t.isPodIP(ip)
	hostLoopback := ip == loopback4 || ip == netip.IPv6Loopback()
	src := canon(c.Src)
	proxyUID, proxyGID := c.UID == t.ProxyUID, c.GID == t.ProxyGID

	if slices.Contains(t.ExcludeOutboundPorts, port) {
		return TargetNone, ReasonExcludedPort
	}
	if viaLo && (src == passthrough4 || src == passthrough6) {
		return TargetNone, ReasonInboundPassthroughSource
	}
	hairpin := viaLo && !hostLoopback && port != tunnelPort
	if proxyUID {
		if hairpin {
			return TargetInbound, ReasonProxyHairpin
		}
		return TargetNone, ReasonProxyUID
	}
	if viaLo && !t.IncludeOutboundLoopback {
		return TargetNone, ReasonLoopback
	}
	if proxyGID {
		if hairpin {
			return TargetInbound, ReasonProxyHairpin
		}
		return TargetNone, ReasonProxyGID
	}
	if hostLoopback {
		return TargetNone, ReasonLoopback
	}
	if anyContains(t.ExcludeOutboundRanges, ip) {
		return TargetNone, ReasonExcludedRange
	}
	if slices.Contains(t.IncludeOutboundPorts, port) {
		return TargetOutbound, ReasonCaptured
	}
	if t.IncludeAllOutbound || anyContains(t.IncludeOutboundRanges, ip) {
		return TargetOutbound, ReasonCaptured
	}
	return TargetNone, ReasonNotIncluded
}

// prerouting is the ISTIO_INBOUND chain in REDIRECT mode (run.go#L115-L170),
// for a connection from outside the pod. It has no source rule: the
// 127.0.0.6 / ::6 exemption is in ISTIO_OUTPUT and holds only over lo, so an
// IPv6 SYN from ::6 (or from the pod's own IPv6 address) arriving on eth0 is
// captured like any other. IPv4 loopback sources and the pod's own IPv4
// addresses never arrive from outside: the kernel drops them as martians.
func (t Traffic) prerouting(c Conn) (Target, Reason) {
	s, d := canon(c.Src), canon(c.Dst.Addr())
	if !s.IsValid() || !d.IsValid() {
		return TargetNone, ReasonInvalidAddress
	}
	if d.Is6() && !t.CaptureIPv6() {
		return TargetNone, ReasonIPv6NotCaptured
	}
	if s.IsLoopback() || d.IsLoopback() || s.IsUnspecified() || d.IsUnspecified() ||
		(s.Is4() && t.isPodIP(s)) {
		return TargetNone, ReasonMartian
	}
	port := c.Dst.Port()
	if isProxyPort(port) || port == t.InboundPort || port == t.OutboundPort {
		return TargetNone, ReasonProxyPort
	}
	if t.IncludeAllInbound {
		if slices.Contains(t.ExcludeInboundPorts, port) {
			return TargetNone, ReasonExcludedInboundPort
		}
		return TargetInbound, ReasonCaptured
	}
	if slices.Contains(t.IncludeInboundPorts, port) {
		return TargetInbound, ReasonCaptured
	}
	return TargetNone, ReasonNotIncludedPort
}

func anyContains(prefixes []netip.Prefix, ip netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

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

	// Inbound.
	ReasonInboundPassthroughSource Reason = "inbound-passthrough-source" // from 127.0.0.6 or ::6 (Envoy)
	ReasonProxyPort                Reason = "proxy-port"                 // to one of the sidecar's own ports
	ReasonExcludedInboundPort      Reason = "excluded-inbound-port"      // excludeInboundPorts
	ReasonNotIncludedPort          Reason = "not-included-port"          // not in includeInboundPorts
)

// Permalink for the rule references below.
//
// istio-iptables: https://github.com/istio/istio/blob/86c9f01fd735fb01d8192f5bcaf0d424afb7f14c/tools/istio-iptables/pkg/capture/run.go

var (
	loopback4    = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	passthrough4 = netip.AddrFrom4([4]byte{127, 0, 0, 6})
	passthrough6 = netip.AddrFrom16([16]byte{15: 6}) // ::6
)

// canon returns a as the datapath sees it: v4-mapped addresses as IPv4,
// without an IPv6 zone.
func canon(a netip.Addr) netip.Addr { return a.Unmap().WithZone("") }

// CaptureOutbound says whether a TCP connect() from the pod to dst, made by
// a process with (file system) uid and gid, is sent to the sidecar's
// outbound port, and why. See the package documentation for the rules.
//
// Checked against istio-iptables' ISTIO_OUTPUT chain (run.go, see the
// permalink above):
//   - excludeOutboundPorts is Istio's first rule (#L282-L288), before uid,
//     gid and loopback. All of them say no, so only the reason differs.
//   - Istio's loopback rules: "-o lo ! --uid-owner proxy -j RETURN" unless
//     an include range is loopback (#L318-L336), then "-d 127.0.0.1/32 -j
//     RETURN" / "-d ::1/128" (#L393-L396).
//   - Excluded ranges (#L398-L404) come BEFORE includeOutboundPorts (#L406),
//     and includes last (#L408-L409). meshsplice's first specification put
//     includeOutboundPorts before the excluded ranges; istio-iptables has
//     had them in this order since the port inclusion was added
//     (istio/istio#23941), so an excluded range wins over an included port
//     here, as in Istio.
//   - The proxy's own lo connections to non-127.0.0.1 addresses go to the
//     inbound port in Istio (#L294-L316); here they are proxy-uid/proxy-gid.
func (t Traffic) CaptureOutbound(dst netip.AddrPort, uid, gid uint32) (bool, Reason) {
	if !t.Capture {
		return false, ReasonNotMeshed
	}
	ip := canon(dst.Addr())
	if !ip.IsValid() {
		return false, ReasonInvalidAddress
	}
	if uid == t.ProxyUID {
		return false, ReasonProxyUID
	}
	if gid == t.ProxyGID {
		return false, ReasonProxyGID
	}
	if ip.IsUnspecified() || ip == loopback4 || ip == netip.IPv6Loopback() ||
		(ip.IsLoopback() && !t.IncludeOutboundLoopback) {
		return false, ReasonLoopback
	}
	port := dst.Port()
	if slices.Contains(t.ExcludeOutboundPorts, port) {
		return false, ReasonExcludedPort
	}
	if anyContains(t.ExcludeOutboundRanges, ip) {
		return false, ReasonExcludedRange
	}
	if slices.Contains(t.IncludeOutboundPorts, port) {
		return true, ReasonCaptured
	}
	if t.IncludeAllOutbound || anyContains(t.IncludeOutboundRanges, ip) {
		return true, ReasonCaptured
	}
	return false, ReasonNotIncluded
}

// CaptureInbound says whether a TCP connection from src to the pod's dst is
// handed to the sidecar's inbound port, and why. Only dst's port is judged
// (Istio's inbound rules never look at the destination address), besides
// loopback. See the package documentation for the rules.
//
// Checked against istio-iptables' ISTIO_INBOUND chain (run.go, see the
// permalink above):
//   - The 127.0.0.6 / ::6 source rule: Envoy's inbound passthrough cluster
//     binds there to reach the app at the pod IP. In REDIRECT mode Istio
//     keeps that connection out of the proxy's lo hairpin to 15006 with
//     "-o lo -s 127.0.0.6/32 -j RETURN" in ISTIO_OUTPUT (#L290-L292); in
//     TPROXY mode ISTIO_INBOUND has the same test (#L438-L442). Other
//     connections over lo never traverse nat PREROUTING, which the loopback
//     rule stands for.
//   - Istio itself always skips only port 15008 (#L258-L260); the injector
//     adds 15090, 15021 and the status port to excludeInboundPorts. We skip
//     all of ProxyPorts and the configured capture ports, always.
//   - excludeInboundPorts is applied only with includeInboundPorts "*"
//     (#L120-L127); with an explicit list Istio redirects exactly the listed
//     ports. meshsplice's first specification applied the exclusions to
//     lists too; ParseTraffic empties ExcludeInboundPorts without "*", so
//     both readings agree on every parsed Traffic.
//   - A connection the pod makes to its own IP is, in Istio, captured inbound
//     only when the proxy made it (#L294-L316). This function cannot tell;
//     the datapath must (see the package documentation).
func (t Traffic) CaptureInbound(dst netip.AddrPort, src netip.Addr) (bool, Reason) {
	if !t.Capture {
		return false, ReasonNotMeshed
	}
	s, d := canon(src), canon(dst.Addr())
	if !s.IsValid() || !d.IsValid() {
		return false, ReasonInvalidAddress
	}
	if s == passthrough4 || s == passthrough6 {
		return false, ReasonInboundPassthroughSource
	}
	if s.IsLoopback() || d.IsLoopback() || s.IsUnspecified() || d.IsUnspecified() {
		return false, ReasonLoopback
	}
	port := dst.Port()
	if isProxyPort(port) || port == t.InboundPort || port == t.OutboundPort {
		return false, ReasonProxyPort
	}
	if t.IncludeAllInbound {
		if slices.Contains(t.ExcludeInboundPorts, port) {
			return false, ReasonExcludedInboundPort
		}
		return true, ReasonCaptured
	}
	if slices.Contains(t.IncludeInboundPorts, port) {
		return true, ReasonCaptured
	}
	return false, ReasonNotIncludedPort
}

func anyContains(prefixes []netip.Prefix, ip netip.Addr) bool {
	for _, p := range prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

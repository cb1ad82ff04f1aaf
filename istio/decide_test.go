package istio

import (
	"fmt"
	"net/netip"
	"testing"
)

// mapped returns the v4-mapped form of an IPv4 address and ok, or ok false
// for anything else.
func mapped(a netip.Addr) (netip.Addr, bool) {
	if !a.Is4() {
		return a, false
	}
	return netip.AddrFrom16(a.As16()), true
}

func TestCaptureOutbound(t *testing.T) {
	const app, proxy = 1000, 1337

	off := base()
	off.Capture, off.Splice = false, false

	// Capture everything but some ports and ranges; 5432 by port.
	all := base()
	all.ExcludeOutboundPorts = []uint16{3306}
	all.ExcludeOutboundRanges = pfx("10.96.0.0/12", "fd00:96::/32")
	all.IncludeOutboundPorts = []uint16{5432}

	// Capture some ranges, minus narrower ones; 5432 by port.
	ranged := base()
	ranged.IncludeAllOutbound = false
	ranged.IncludeOutboundRanges = pfx("10.0.0.0/8", "192.168.0.0/24", "2001:db8::/32")
	ranged.ExcludeOutboundRanges = pfx("10.1.0.0/16", "192.0.0.0/8", "2001:db8:1::/48")
	ranged.IncludeOutboundPorts = []uint16{5432}
	ranged.ExcludeOutboundPorts = []uint16{3306}

	// Ports only: includeOutboundIPRanges "".
	portsOnly := base()
	portsOnly.IncludeAllOutbound = false
	portsOnly.IncludeOutboundPorts = []uint16{5432}

	// includeOutboundIPRanges names loopback addresses.
	loopInc := ranged
	loopInc.IncludeOutboundRanges = pfx("10.0.0.0/8", "127.0.0.0/24", "::1/128")
	loopInc.ExcludeOutboundRanges = pfx("127.0.0.128/25")
	loopInc.IncludeOutboundLoopback = true

	// Other proxy identity.
	otherID := all
	otherID.ProxyUID, otherID.ProxyGID = 2000, 3000

	// IPv4-wide and IPv6-wide ranges never match the other family.
	v4Only := base()
	v4Only.IncludeAllOutbound = false
	v4Only.IncludeOutboundRanges = pfx("0.0.0.0/0")
	v6Only := base()
	v6Only.IncludeAllOutbound = false
	v6Only.IncludeOutboundRanges = pfx("::/0")
	v6Excl := base()
	v6Excl.ExcludeOutboundRanges = pfx("::/0")

	tests := []struct {
		name     string
		tr       Traffic
		dst      string
		uid, gid uint32
		want     bool
		reason   Reason
	}{
		{"not meshed v4", off, "10.1.2.3:80", app, app, false, ReasonNotMeshed},
		{"not meshed v6", off, "[2001:db8::1]:80", app, app, false, ReasonNotMeshed},
		{"not meshed, proxy", off, "10.1.2.3:80", proxy, proxy, false, ReasonNotMeshed},
		{"invalid destination", all, "", app, app, false, ReasonInvalidAddress},

		{"proxy uid v4", all, "8.8.8.8:443", proxy, app, false, ReasonProxyUID},
		{"proxy uid v6", all, "[2001:4860::8888]:443", proxy, app, false, ReasonProxyUID},
		{"proxy uid and gid", all, "8.8.8.8:443", proxy, proxy, false, ReasonProxyUID},
		{"proxy uid beats include port", all, "8.8.8.8:5432", proxy, app, false, ReasonProxyUID},
		{"proxy gid v4", all, "8.8.8.8:443", app, proxy, false, ReasonProxyGID},
		{"proxy gid v6", all, "[2001:4860::8888]:443", app, proxy, false, ReasonProxyGID},
		{"other proxy uid", otherID, "8.8.8.8:443", 2000, app, false, ReasonProxyUID},
		{"other proxy gid", otherID, "8.8.8.8:443", app, 3000, false, ReasonProxyGID},
		{"default ids are not the proxy when overridden", otherID, "8.8.8.8:443", proxy, proxy, true, ReasonCaptured},

		{"loopback 127.0.0.1", all, "127.0.0.1:8080", app, app, false, ReasonLoopback},
		{"loopback 127.0.0.53", all, "127.0.0.53:53", app, app, false, ReasonLoopback},
		{"loopback 127.255.255.255", all, "127.255.255.255:80", app, app, false, ReasonLoopback},
		{"loopback ::1", all, "[::1]:8080", app, app, false, ReasonLoopback},
		{"unspecified 0.0.0.0", all, "0.0.0.0:8080", app, app, false, ReasonLoopback},
		{"unspecified ::", all, "[::]:8080", app, app, false, ReasonLoopback},
		{"loopback beats include port", all, "127.0.0.1:5432", app, app, false, ReasonLoopback},
		{"128.0.0.1 is not loopback", all, "128.0.0.1:80", app, app, true, ReasonCaptured},
		{"::2 is not loopback", all, "[::2]:80", app, app, true, ReasonCaptured},
		{"loopback included: 127.0.0.1 stays exempt", loopInc, "127.0.0.1:80", app, app, false, ReasonLoopback},
		{"loopback included: ::1 stays exempt", loopInc, "[::1]:80", app, app, false, ReasonLoopback},
		{"loopback included: 0.0.0.0 stays exempt", loopInc, "0.0.0.0:80", app, app, false, ReasonLoopback},
		{"loopback included: :: stays exempt", loopInc, "[::]:80", app, app, false, ReasonLoopback},
		{"loopback included: 127.0.0.53 captured", loopInc, "127.0.0.53:53", app, app, true, ReasonCaptured},
		{"loopback included: excluded range", loopInc, "127.0.0.200:53", app, app, false, ReasonExcludedRange},
		{"loopback included: outside the ranges", loopInc, "127.0.1.1:53", app, app, false, ReasonNotIncluded},
		{"loopback included: by port", loopInc, "127.0.1.1:5432", app, app, true, ReasonCaptured},
		{"loopback included: excluded port", loopInc, "127.0.0.53:3306", app, app, false, ReasonExcludedPort},
		{"loopback included: proxy to 127.0.0.53 goes to the inbound port", loopInc, "127.0.0.53:53", proxy, proxy, false, ReasonProxyHairpin},
		{"proxy to 127.0.0.53 goes to the inbound port", all, "127.0.0.53:53", proxy, app, false, ReasonProxyHairpin},
		{"proxy to 127.0.0.1 is left alone", all, "127.0.0.1:8080", proxy, proxy, false, ReasonProxyUID},
		{"proxy to 127.0.0.53:15008 is left alone", all, "127.0.0.53:15008", proxy, proxy, false, ReasonProxyUID},
		{"excluded port beats the proxy uid (istio-iptables order)", all, "127.0.0.53:3306", proxy, proxy, false, ReasonExcludedPort},

		{"excluded port v4", all, "8.8.8.8:3306", app, app, false, ReasonExcludedPort},
		{"excluded port v6", all, "[2001:4860::8888]:3306", app, app, false, ReasonExcludedPort},
		{"excluded port beats included range", ranged, "10.2.0.1:3306", app, app, false, ReasonExcludedPort},

		{"excluded range v4", all, "10.96.0.10:53", app, app, false, ReasonExcludedRange},
		{"excluded range v4, last address", all, "10.111.255.255:53", app, app, false, ReasonExcludedRange},
		{"just outside excluded range v4", all, "10.112.0.0:53", app, app, true, ReasonCaptured},
		{"excluded range v6", all, "[fd00:96::a]:53", app, app, false, ReasonExcludedRange},
		{"just outside excluded range v6", all, "[fd00:97::a]:53", app, app, true, ReasonCaptured},
		{"excluded range inside included range v4", ranged, "10.1.2.3:80", app, app, false, ReasonExcludedRange},
		{"excluded range inside included range v6", ranged, "[2001:db8:1::5]:80", app, app, false, ReasonExcludedRange},
		{"excluded range wider than included range", ranged, "192.168.0.1:80", app, app, false, ReasonExcludedRange},
		{"excluded range beats included port v4 (istio-iptables order)", ranged, "10.1.2.3:5432", app, app, false, ReasonExcludedRange},
		{"excluded range beats included port v6 (istio-iptables order)", ranged, "[2001:db8:1::5]:5432", app, app, false, ReasonExcludedRange},
		{"excluded range beats included port with wildcard", all, "10.96.0.10:5432", app, app, false, ReasonExcludedRange},
		{"v6 exclusion does not touch IPv4", v6Excl, "10.1.2.3:80", app, app, true, ReasonCaptured},
		{"v6 exclusion ::/0", v6Excl, "[2001:db8::1]:80", app, app, false, ReasonExcludedRange},

		{"included port v4 outside ranges", ranged, "8.8.8.8:5432", app, app, true, ReasonCaptured},
		{"included port v6 outside ranges", ranged, "[2001:4860::8888]:5432", app, app, true, ReasonCaptured},
		{"included port, no ranges v4", portsOnly, "8.8.8.8:5432", app, app, true, ReasonCaptured},
		{"included port, no ranges v6", portsOnly, "[2001:4860::8888]:5432", app, app, true, ReasonCaptured},
		{"not included port, no ranges", portsOnly, "8.8.8.8:443", app, app, false, ReasonNotIncluded},

		{"wildcard v4", all, "8.8.8.8:443", app, app, true, ReasonCaptured},
		{"wildcard v6", all, "[2001:4860::8888]:443", app, app, true, ReasonCaptured},
		{"included range v4", ranged, "10.2.0.1:80", app, app, true, ReasonCaptured},
		{"included range v4, first address", ranged, "10.0.0.0:80", app, app, true, ReasonCaptured},
		{"included range v6", ranged, "[2001:db8:2::1]:80", app, app, true, ReasonCaptured},
		{"included range v6 with zone", ranged, "[2001:db8:2::1%eth0]:80", app, app, true, ReasonCaptured},
		{"not included v4", ranged, "8.8.8.8:443", app, app, false, ReasonNotIncluded},
		{"not included v6", ranged, "[2001:4860::8888]:443", app, app, false, ReasonNotIncluded},
		{"0.0.0.0/0 captures IPv4", v4Only, "8.8.8.8:443", app, app, true, ReasonCaptured},
		{"0.0.0.0/0 does not capture IPv6", v4Only, "[2001:4860::8888]:443", app, app, false, ReasonNotIncluded},
		{"::/0 captures IPv6", v6Only, "[2001:4860::8888]:443", app, app, true, ReasonCaptured},
		{"::/0 does not capture IPv4", v6Only, "8.8.8.8:443", app, app, false, ReasonNotIncluded},
	}

	run := func(name string, tr Traffic, dst netip.AddrPort, uid, gid uint32, want bool, reason Reason) {
		t.Run(name, func(t *testing.T) {
			got, why := tr.CaptureOutbound(dst, uid, gid)
			if got != want || why != reason {
				t.Errorf("CaptureOutbound(%v, uid %d, gid %d) = %v, %q; want %v, %q", dst, uid, gid, got, why, want, reason)
			}
		})
	}
	for _, tt := range tests {
		var dst netip.AddrPort
		if tt.dst != "" {
			dst = netip.MustParseAddrPort(tt.dst)
		}
		run(tt.name, tt.tr, dst, tt.uid, tt.gid, tt.want, tt.reason)
		// A dual-stack socket talking IPv4 must get the same answer.
		if m, ok := mapped(dst.Addr()); ok {
			run(tt.name+" (v4-mapped)", tt.tr, netip.AddrPortFrom(m, dst.Port()), tt.uid, tt.gid, tt.want, tt.reason)
		}
	}
}

func TestCaptureInbound(t *testing.T) {
	off := base()
	off.Capture, off.Splice = false, false

	all := base()
	all.ExcludeInboundPorts = []uint16{22, 9090}

	list := base()
	list.IncludeAllInbound = false
	list.IncludeInboundPorts = []uint16{8080, 9080, 15021}

	none := base()
	none.IncludeAllInbound = false

	// Not produced by ParseTraffic: an explicit list and exclusions. Istio
	// ignores the exclusions then.
	both := list
	both.ExcludeInboundPorts = []uint16{8080}

	custom := all
	custom.OutboundPort, custom.InboundPort = 16001, 16006

	const pod4, pod6 = "10.1.0.5", "[2001:db8::5]"
	const peer4, peer6 = "10.2.0.9", "2001:db8::9"

	tests := []struct {
		name   string
		tr     Traffic
		dst    string
		src    string
		want   bool
		reason Reason
	}{
		{"not meshed v4", off, pod4 + ":8080", peer4, false, ReasonNotMeshed},
		{"not meshed v6", off, pod6 + ":8080", peer6, false, ReasonNotMeshed},
		{"invalid source", all, pod4 + ":8080", "", false, ReasonInvalidAddress},
		{"invalid destination", all, "", peer4, false, ReasonInvalidAddress},

		// From outside the pod: the passthrough exemption is only for lo.
		{"passthrough source v4 from outside is a martian", all, pod4 + ":8080", "127.0.0.6", false, ReasonMartian},
		{"passthrough source v6 from outside is captured", all, pod6 + ":8080", "::6", true, ReasonCaptured},
		{"passthrough source from outside, proxy port", all, pod6 + ":15021", "::6", false, ReasonProxyPort},
		{"::7 is not the passthrough source", all, pod6 + ":8080", "::7", true, ReasonCaptured},

		{"loopback source v4", all, pod4 + ":8080", "127.0.0.1", false, ReasonMartian},
		{"loopback source v6", all, pod6 + ":8080", "::1", false, ReasonMartian},
		{"loopback destination v4", all, "127.0.0.1:8080", peer4, false, ReasonMartian},
		{"loopback destination v6", all, "[::1]:8080", peer6, false, ReasonMartian},
		{"unspecified source", all, pod4 + ":8080", "0.0.0.0", false, ReasonMartian},

		{"proxy port v6", all, pod6 + ":15008", peer6, false, ReasonProxyPort},
		{"proxy port even when listed", list, pod4 + ":15021", peer4, false, ReasonProxyPort},
		{"configured inbound port", custom, pod4 + ":16006", peer4, false, ReasonProxyPort},
		{"configured outbound port", custom, pod4 + ":16001", peer4, false, ReasonProxyPort},
		{"default proxy ports stay excluded with custom capture ports", custom, pod4 + ":15006", peer4, false, ReasonProxyPort},

		{"wildcard v4", all, pod4 + ":8080", peer4, true, ReasonCaptured},
		{"wildcard v6", all, pod6 + ":8080", peer6, true, ReasonCaptured},
		{"wildcard, port 1", all, pod4 + ":1", peer4, true, ReasonCaptured},
		{"wildcard, port 65535", all, pod4 + ":65535", peer4, true, ReasonCaptured},
		{"wildcard, port next to a proxy port", all, pod4 + ":15007", peer4, true, ReasonCaptured},
		{"excluded v4", all, pod4 + ":9090", peer4, false, ReasonExcludedInboundPort},
		{"excluded v6", all, pod6 + ":22", peer6, false, ReasonExcludedInboundPort},
		{"destination address does not matter", all, "192.0.2.77:8080", peer4, true, ReasonCaptured},
		{"source from the pod itself", all, pod4 + ":8080", "10.1.0.5", true, ReasonCaptured},

		{"listed v4", list, pod4 + ":8080", peer4, true, ReasonCaptured},
		{"listed v6", list, pod6 + ":9080", peer6, true, ReasonCaptured},
		{"not listed v4", list, pod4 + ":8081", peer4, false, ReasonNotIncludedPort},
		{"not listed v6", list, pod6 + ":22", peer6, false, ReasonNotIncludedPort},
		{"empty list v4", none, pod4 + ":8080", peer4, false, ReasonNotIncludedPort},
		{"empty list v6", none, pod6 + ":8080", peer6, false, ReasonNotIncludedPort},
		{"list ignores exclusions (Istio)", both, pod4 + ":8080", peer4, true, ReasonCaptured},
	}

	run := func(name string, tr Traffic, dst netip.AddrPort, src netip.Addr, want bool, reason Reason) {
		t.Run(name, func(t *testing.T) {
			got, why := tr.CaptureInbound(dst, src)
			if got != want || why != reason {
				t.Errorf("CaptureInbound(%v, from %v) = %v, %q; want %v, %q", dst, src, got, why, want, reason)
			}
		})
	}
	for _, tt := range tests {
		var dst netip.AddrPort
		var src netip.Addr
		if tt.dst != "" {
			dst = netip.MustParseAddrPort(tt.dst)
		}
		if tt.src != "" {
			src = netip.MustParseAddr(tt.src)
		}
		run(tt.name, tt.tr, dst, src, tt.want, tt.reason)
		md, okd := mapped(dst.Addr())
		ms, oks := mapped(src)
		if okd || oks {
			run(tt.name+" (v4-mapped)", tt.tr, netip.AddrPortFrom(md, dst.Port()), ms, tt.want, tt.reason)
		}
	}

	// Every proxy port, both families.
	for _, port := range ProxyPorts {
		for _, dst := range []string{pod4, pod6} {
			run(fmt.Sprintf("proxy port %s:%d", dst, port), all,
				netip.MustParseAddrPort(fmt.Sprintf("%s:%d", dst, port)), netip.MustParseAddr(peer4), false, ReasonProxyPort)
		}
	}
}

// TestDecisionsFromAnnotations runs the decisions on parsed annotations, end
// to end.
func TestDecisionsFromAnnotations(t *testing.T) {
	tr, warnings, err := ParseTraffic(pod(
		AnnotationIncludeOutboundIPRanges, "10.0.0.0/8, ::ffff:172.16.0.0/108, 2001:db8::/32",
		AnnotationExcludeOutboundIPRanges, "10.96.0.10",
		AnnotationIncludeOutboundPorts, "5432",
		AnnotationExcludeOutboundPorts, "3306",
		AnnotationExcludeInboundPorts, "9090",
		AnnotationStatusPort, "15999",
	), DefaultDefaults())
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 {
		t.Errorf("warnings = %q, want one for the v4-mapped range", warnings)
	}
	out := []struct {
		dst    string
		uid    uint32
		want   bool
		reason Reason
	}{
		{"10.1.2.3:80", 1000, true, ReasonCaptured},
		{"[::ffff:10.1.2.3]:80", 1000, true, ReasonCaptured},
		{"172.16.5.5:80", 1000, true, ReasonCaptured},
		{"[::ffff:172.16.5.5]:80", 1000, true, ReasonCaptured},
		{"[2001:db8::7]:80", 1000, true, ReasonCaptured},
		{"10.96.0.10:53", 1000, false, ReasonExcludedRange},
		{"10.96.0.10:5432", 1000, false, ReasonExcludedRange},
		{"8.8.8.8:5432", 1000, true, ReasonCaptured},
		{"10.1.2.3:3306", 1000, false, ReasonExcludedPort},
		{"8.8.8.8:443", 1000, false, ReasonNotIncluded},
		{"10.1.2.3:80", 1337, false, ReasonProxyUID},
		{"127.0.0.1:80", 1000, false, ReasonLoopback},
	}
	for _, tt := range out {
		dst := netip.MustParseAddrPort(tt.dst)
		if got, why := tr.CaptureOutbound(dst, tt.uid, tt.uid); got != tt.want || why != tt.reason {
			t.Errorf("CaptureOutbound(%v, %d) = %v, %q; want %v, %q", dst, tt.uid, got, why, tt.want, tt.reason)
		}
	}
	peer := netip.MustParseAddr("10.2.0.9")
	in := []struct {
		port   uint16
		want   bool
		reason Reason
	}{
		{8080, true, ReasonCaptured},
		{9090, false, ReasonExcludedInboundPort},
		{15999, false, ReasonExcludedInboundPort},
		{15020, false, ReasonProxyPort},
		{15008, false, ReasonProxyPort},
	}
	for _, tt := range in {
		dst := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.5"), tt.port)
		if got, why := tr.CaptureInbound(dst, peer); got != tt.want || why != tt.reason {
			t.Errorf("CaptureInbound(%v) = %v, %q; want %v, %q", dst, got, why, tt.want, tt.reason)
		}
	}
}

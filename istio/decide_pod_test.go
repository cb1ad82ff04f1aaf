package istio

import (
	"net/netip"
	"testing"
)

// TestDecideInsideThePod: connections a pod makes to itself, rule by rule
// of istio-iptables' ISTIO_OUTPUT (baseline/testdata/istio-sidecar-v4.golden):
// an app calling its own pod IP leaves through lo and is RETURNed; the
// proxy's own lo connections (but to 127.0.0.1/::1 and 15008) go to the
// inbound port; Envoy's passthrough from 127.0.0.6 / ::6 is RETURNed.
func TestDecideInsideThePod(t *testing.T) {
	const app, proxy = 1000, 1337
	pod4, pod6 := netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("2001:db8::5")

	all := base()
	all.PodIPs = []netip.Addr{pod4, pod6}
	all.DualStack = true
	all.ExcludeOutboundPorts = []uint16{3306}

	loopInc := all
	loopInc.IncludeAllOutbound = false
	loopInc.IncludeOutboundRanges = pfx("127.0.0.0/8", "10.0.0.0/8")
	loopInc.IncludeOutboundLoopback = true

	ranged := all
	ranged.IncludeAllOutbound = false
	ranged.IncludeOutboundRanges = pfx("192.168.0.0/16")

	none := netip.Addr{}
	p4, p6 := netip.MustParseAddr("127.0.0.6"), netip.MustParseAddr("::6")
	tests := []struct {
		name     string
		tr       Traffic
		src      netip.Addr
		dst      netip.AddrPort
		uid, gid uint32
		want     Target
		reason   Reason
	}{
		{"app to its own pod IP v4", all, none, netip.AddrPortFrom(pod4, 8080), app, app, TargetNone, ReasonLoopback},
		{"app to its own pod IP v6", all, none, netip.AddrPortFrom(pod6, 8080), app, app, TargetNone, ReasonLoopback},
		{"app to its own pod IP, excluded port", all, none, netip.AddrPortFrom(pod4, 3306), app, app, TargetNone, ReasonExcludedPort},
		{"app to its own pod IP, loopback included: judged by the ranges", loopInc, none, netip.AddrPortFrom(pod4, 8080), app, app, TargetOutbound, ReasonCaptured},
		{"app to its own pod IP v6, loopback included: not in the ranges", loopInc, none, netip.AddrPortFrom(pod6, 8080), app, app, TargetNone, ReasonNotIncluded},
		{"app to its own pod IP, not in the ranges", ranged, none, netip.AddrPortFrom(pod4, 8080), app, app, TargetNone, ReasonLoopback},

		{"proxy uid to its own pod IP v4: inbound port", all, none, netip.AddrPortFrom(pod4, 8080), proxy, proxy, TargetInbound, ReasonProxyHairpin},
		{"proxy uid to its own pod IP v6: inbound port", all, none, netip.AddrPortFrom(pod6, 8080), proxy, app, TargetInbound, ReasonProxyHairpin},
		{"proxy uid to its own pod IP, an excluded inbound port: inbound port too", all, none, netip.AddrPortFrom(pod4, 15020), proxy, proxy, TargetInbound, ReasonProxyHairpin},
		{"proxy uid to its own pod IP:15008", all, none, netip.AddrPortFrom(pod4, 15008), proxy, proxy, TargetNone, ReasonProxyUID},
		{"proxy uid to its own pod IP, excluded outbound port", all, none, netip.AddrPortFrom(pod4, 3306), proxy, proxy, TargetNone, ReasonExcludedPort},
		{"proxy uid to 127.0.0.1", all, none, netip.MustParseAddrPort("127.0.0.1:8080"), proxy, proxy, TargetNone, ReasonProxyUID},
		{"proxy uid to ::1", all, none, netip.MustParseAddrPort("[::1]:8080"), proxy, proxy, TargetNone, ReasonProxyUID},
		{"proxy uid to 0.0.0.0 (127.0.0.1)", all, none, netip.MustParseAddrPort("0.0.0.0:8080"), proxy, proxy, TargetNone, ReasonProxyUID},
		{"proxy uid to 127.0.0.2: inbound port", all, none, netip.MustParseAddrPort("127.0.0.2:8080"), proxy, proxy, TargetInbound, ReasonProxyHairpin},
		{"proxy gid only, to its own pod IP: the uid rule RETURNs first", all, none, netip.AddrPortFrom(pod4, 8080), app, proxy, TargetNone, ReasonLoopback},
		{"proxy gid only, to its own pod IP, loopback included: inbound port", loopInc, none, netip.AddrPortFrom(pod4, 8080), app, proxy, TargetInbound, ReasonProxyHairpin},
		{"proxy gid only, elsewhere", all, none, netip.MustParseAddrPort("192.0.2.1:80"), app, proxy, TargetNone, ReasonProxyGID},

		{"passthrough 127.0.0.6 to its own pod IP", all, p4, netip.AddrPortFrom(pod4, 8080), proxy, proxy, TargetNone, ReasonInboundPassthroughSource},
		{"passthrough ::6 to its own pod IP", all, p6, netip.AddrPortFrom(pod6, 8080), proxy, proxy, TargetNone, ReasonInboundPassthroughSource},
		{"passthrough source to a remote address is not lo", all, p6, netip.MustParseAddrPort("[2001:db8::9]:80"), proxy, proxy, TargetNone, ReasonProxyUID},
		{"other source to its own pod IP", all, netip.MustParseAddr("127.0.0.7"), netip.AddrPortFrom(pod4, 8080), proxy, proxy, TargetInbound, ReasonProxyHairpin},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Conn{Local: true, Src: tt.src, Dst: tt.dst, UID: tt.uid, GID: tt.gid}
			if got, why := tt.tr.Decide(c); got != tt.want || why != tt.reason {
				t.Errorf("Decide(%+v) = %v, %q; want %v, %q", c, got, why, tt.want, tt.reason)
			}
		})
	}
}

// TestDecideFromOutside: only lo carries the passthrough exemption. From
// outside, ::6 and the pod's own IPv6 address are sources like any other;
// their IPv4 twins are martians the kernel drops.
func TestDecideFromOutside(t *testing.T) {
	pod4, pod6 := netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("2001:db8::5")
	tr := base()
	tr.PodIPs = []netip.Addr{pod4, pod6}
	tr.DualStack = true
	tests := []struct {
		name   string
		src    string
		dst    netip.AddrPort
		want   Target
		reason Reason
	}{
		{"::6 on eth0 is captured", "::6", netip.AddrPortFrom(pod6, 8080), TargetInbound, ReasonCaptured},
		{"the pod's own IPv6 on eth0 is captured", pod6.String(), netip.AddrPortFrom(pod6, 8080), TargetInbound, ReasonCaptured},
		{"127.0.0.6 on eth0 is a martian", "127.0.0.6", netip.AddrPortFrom(pod4, 8080), TargetNone, ReasonMartian},
		{"the pod's own IPv4 on eth0 is a martian", pod4.String(), netip.AddrPortFrom(pod4, 8080), TargetNone, ReasonMartian},
		{"a peer", "10.2.0.9", netip.AddrPortFrom(pod4, 8080), TargetInbound, ReasonCaptured},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Conn{Src: netip.MustParseAddr(tt.src), Dst: tt.dst}
			if got, why := tr.Decide(c); got != tt.want || why != tt.reason {
				t.Errorf("Decide(%+v) = %v, %q; want %v, %q", c, got, why, tt.want, tt.reason)
			}
		})
	}
}

// TestCaptureIPv6 follows istio-iptables' ENABLE_INBOUND_IPV6 derivation
// (getLocalIP): no ip6tables rules at all unless the pod is IPv6-only, or
// dual-stack with ISTIO_DUAL_STACK.
func TestCaptureIPv6(t *testing.T) {
	ips := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	tests := []struct {
		name      string
		podIPs    []netip.Addr
		dualStack bool
		want      bool
	}{
		{"IPv4-only pod", ips("10.1.0.5"), false, false},
		{"IPv4-only pod, dual-stack mesh", ips("10.1.0.5"), true, false},
		{"IPv6-only pod", ips("2001:db8::5"), false, true},
		{"IPv6-only pod, dual-stack mesh", ips("2001:db8::5"), true, true},
		{"dual-stack pod without ISTIO_DUAL_STACK", ips("10.1.0.5", "2001:db8::5"), false, false},
		{"dual-stack pod without ISTIO_DUAL_STACK, IPv6 listed first", ips("2001:db8::5", "10.1.0.5"), false, false},
		{"dual-stack pod with ISTIO_DUAL_STACK", ips("10.1.0.5", "2001:db8::5"), true, true},
		{"link-local IPv6 only does not count", ips("10.1.0.5", "fe80::1"), true, false},
		{"IPv6 pod with a link-local IPv4", ips("169.254.1.1", "2001:db8::5"), false, true},
		{"addresses unknown", nil, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := base()
			tr.PodIPs, tr.DualStack = tt.podIPs, tt.dualStack
			if got := tr.CaptureIPv6(); got != tt.want {
				t.Fatalf("CaptureIPv6() = %v, want %v", got, tt.want)
			}
			v6 := netip.MustParseAddrPort("[2001:db8::9]:80")
			wantOut, wantIn := TargetOutbound, TargetInbound
			if !tt.want {
				wantOut, wantIn = TargetNone, TargetNone
			}
			if got, why := tr.Decide(Conn{Local: true, Dst: v6, UID: 1000, GID: 1000}); got != wantOut {
				t.Errorf("outbound to %v: %v, %s; want %v", v6, got, why, wantOut)
			}
			in := netip.MustParseAddrPort("[2001:db8::5]:8080")
			if got, why := tr.Decide(Conn{Src: v6.Addr(), Dst: in}); got != wantIn {
				t.Errorf("inbound to %v: %v, %s; want %v", in, got, why, wantIn)
			}
			// IPv4 is always captured: istio-iptables always writes its rules.
			v4 := netip.MustParseAddrPort("192.0.2.1:80")
			if got, _ := tr.Decide(Conn{Local: true, Dst: v4, UID: 1000, GID: 1000}); got != TargetOutbound {
				t.Errorf("outbound to %v: %v, want outbound", v4, got)
			}
		})
	}
}

// TestDualStackFromProxyMetadata: ISTIO_DUAL_STACK comes from the proxy's
// environment, which the mesh sets in defaultConfig.proxyMetadata.
func TestDualStackFromProxyMetadata(t *testing.T) {
	for _, tc := range []struct {
		value string
		want  bool
	}{{"true", true}, {"false", false}, {"", false}, {"nonsense", false}} {
		mc := DefaultMeshConfig()
		if tc.value != "" {
			mc.DefaultConfig.ProxyMetadata = map[string]string{"ISTIO_DUAL_STACK": tc.value}
		}
		if got := (Config{Mesh: mc}).Defaults().DualStack; got != tc.want {
			t.Errorf("ISTIO_DUAL_STACK=%q: DualStack = %v, want %v", tc.value, got, tc.want)
		}
	}
}

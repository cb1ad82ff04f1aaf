// Package istio turns a pod's Istio sidecar traffic settings (its
// annotations, plus mesh-wide [Defaults]) into a validated [Traffic] value
// that the meshsplice datapath programs into the kernel, and defines, once,
// which connections that configuration captures ([Traffic.CaptureOutbound],
// [Traffic.CaptureInbound]). The BPF programs mirror these two functions;
// tests compare the two.
//
// The package is pure: no I/O, standard library only.
//
// # Which pods are captured
//
// A pod is captured ([Traffic.Capture]) when all of these hold:
//
//   - it carries sidecar.istio.io/status (the injector wrote it, so a sidecar
//     is present);
//   - sidecar.istio.io/inject is not false (parsed like Istio CNI does, with
//     strconv.ParseBool; an unparsable value is ignored with a warning);
//   - sidecar.istio.io/interceptionMode is not NONE (REDIRECT, the default,
//     and TPROXY are treated alike);
//   - meshsplice.io/capture is not "disabled". A disabled pod is left to
//     whatever Istio itself does (istio-init or istio-cni iptables); its
//     sidecar is still there ([Traffic.Sidecar]), and so is its kernel
//     policy.
//
// meshsplice.io/splice: "disabled" keeps capture but turns sockmap splicing
// off. By default only sidecar <-> sidecar connections are spliced, and the
// application's sockets are never touched; meshsplice.io/app-splice: "true"
// splices the app <-> sidecar hops too (unsafe for apps that read with
// splice(2): see the README). meshsplice.io/proxy-uid and meshsplice.io/proxy-gid
// name the sidecar's identity (default 1337; like istio-iptables' -g, the
// gid follows an overridden uid unless it is given too).
//
// # Annotation syntax
//
// Lists are comma separated. Whitespace around items is allowed, empty items
// are ignored and duplicates collapse; lists come back sorted. Ports are
// 1-65535. Ranges are IPv4 or IPv6 CIDRs; a bare address means /32 or /128;
// host bits are masked off with a warning ("10.1.2.3/8" becomes 10.0.0.0/8);
// an IPv4-mapped range (::ffff:a.b.c.d/n, n >= 96) becomes the IPv4 range
// a.b.c.d/(n-96), because v4-mapped destinations are judged as IPv4. The
// wildcard "*" is allowed only in includeOutboundIPRanges and
// includeInboundPorts, and only on its own. An annotation that is present but
// empty is an empty list: includeInboundPorts: "" captures no inbound
// traffic, includeOutboundIPRanges: "" captures outbound traffic only by port.
// Every bad item is reported, all at once (errors.Join), for example:
//
//	traffic.sidecar.istio.io/excludeOutboundPorts: "70000" is not a port (1-65535)
//	traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0.0/33" is not an IP range (CIDR or address)
//	traffic.sidecar.istio.io/includeInboundPorts: "*" must stand alone, not in "*,8080"
//
// # Outbound: which connect() goes to the sidecar (port 15001)
//
// Rules are tried in order; the first that matches decides:
//
//  1. pod not captured                                    -> no  (not-meshed)
//  2. caller's uid is the proxy uid                       -> no  (proxy-uid)
//  3. caller's gid is the proxy gid                       -> no  (proxy-gid)
//  4. destination is loopback: 127.0.0.0/8, ::1, or the
//     unspecified address (the kernel sends connect(0.0.0.0)
//     to 127.0.0.1) -- see "Loopback" below              -> no  (loopback)
//  5. destination port in excludeOutboundPorts           -> no  (excluded-port)
//  6. destination in an excludeOutboundIPRanges range    -> no  (excluded-range)
//  7. destination port in includeOutboundPorts           -> yes (captured)
//  8. includeOutboundIPRanges is "*" or has a range
//     containing the destination                         -> yes (captured)
//  9. otherwise                                          -> no  (not-included)
//
// A v4-mapped destination (::ffff:10.0.0.1, a dual-stack socket talking IPv4)
// is judged as the IPv4 address; IPv4 ranges never match IPv6 destinations
// and the other way round. Exclusions win over inclusions whatever the prefix
// lengths: with includeOutboundIPRanges "10.0.0.0/8" and
// excludeOutboundIPRanges "10.1.0.0/16", 10.1.2.3 is not captured and
// 10.2.0.1 is. Excluded ranges also win over includeOutboundPorts: with
// includeOutboundPorts "5432" and excludeOutboundIPRanges "10.1.0.0/16",
// 10.1.2.3:5432 is not captured (that is istio-iptables' rule order; see
// below) while 192.0.2.1:5432 is, even if includeOutboundIPRanges is "".
//
// Loopback: like istio-iptables, loopback destinations are never captured,
// except that when includeOutboundIPRanges explicitly lists a range whose
// address is loopback (e.g. "127.0.0.0/8" or "127.1.2.3/32";
// [Traffic.IncludeOutboundLoopback]) only 127.0.0.1, ::1 and the unspecified
// addresses stay exempt and other loopback destinations go on to rules 5-9.
//
// # Inbound: which accepted connection goes to the sidecar (port 15006)
//
//  1. pod not captured                                    -> no  (not-meshed)
//  2. source is 127.0.0.6 or ::6, the address Envoy's
//     inbound passthrough cluster binds to                -> no  (inbound-passthrough-source)
//  3. source or destination is loopback (a connection made
//     inside the pod, never an inbound one)               -> no  (loopback)
//  4. destination port is one of [ProxyPorts] or the
//     configured inbound/outbound capture port            -> no  (proxy-port)
//  5. includeInboundPorts is "*" and the port is in
//     excludeInboundPorts                                 -> no  (excluded-inbound-port)
//  6. includeInboundPorts is "*"                          -> yes (captured)
//  7. port in includeInboundPorts                         -> yes (captured)
//  8. otherwise                                           -> no  (not-included-port)
//
// excludeInboundPorts only applies when includeInboundPorts is "*" (Istio
// documents it so, and istio-iptables emits the exclusions only then);
// [ParseTraffic] empties ExcludeInboundPorts otherwise, so the kernel never
// has to know the difference. The status port (status.sidecar.istio.io/port,
// default [Defaults.StatusPort] 15020) is added to the exclusions, as the
// injector does.
//
// # Differences from istio-iptables
//
// The rule order above was checked against istio-iptables
// (tools/istio-iptables/pkg/capture/run.go, istio/istio at
// https://github.com/istio/istio/blob/86c9f01fd735fb01d8192f5bcaf0d424afb7f14c/tools/istio-iptables/pkg/capture/run.go).
// For what these functions see, they decide as istio-iptables does in
// REDIRECT mode; where two "no" rules overlap only the reported reason may
// differ. The differences:
//
//   - istio-iptables tests excludeOutboundPorts first, before the uid/gid and
//     loopback rules (run.go#L282-L288). Both say no, so only the reason
//     differs: we report proxy-uid/proxy-gid/loopback first.
//   - istio-iptables redirects the proxy's own TCP connections that leave via
//     lo to anything but 127.0.0.1/::1 -- in practice to the pod's own IP, the
//     app -> Envoy -> Envoy -> app hairpin -- to the inbound port 15006, except
//     port 15008 (run.go#L294-L316). [Traffic.CaptureOutbound] says proxy-uid;
//     the datapath handles the hairpin as an inbound connection, which
//     [Traffic.CaptureInbound] decides by port.
//   - istio-iptables lets the app's connections that leave via lo (loopback
//     and the pod's own IPs) bypass the sidecar unless IncludeOutboundLoopback
//     (run.go#L318-L336). These functions do not know the pod's IPs: the
//     datapath must treat a connect() from the app to one of its own pod's
//     addresses like one to 127.0.0.2 (exempt, or judged by rules 5-9 when
//     IncludeOutboundLoopback), and must not capture inbound a connection the
//     pod made to itself unless the proxy made it.
//   - The loopback exemption that always applies is istio-iptables'
//     ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, 127.0.0.1/32 by default
//     (run.go#L393-L396); we do not read that environment variable.
//   - istio-iptables only hard-excludes port 15008 inbound (run.go#L258-L260)
//     and the injector adds 15090, 15021 and the status port to
//     excludeInboundPorts, which only applies with "*". We never capture
//     [ProxyPorts] inbound, even when includeInboundPorts lists them.
//   - Istio rejects bare addresses and whitespace in CIDR lists and rejects
//     empty list items in its injector; we accept them.
//   - Not modelled: DNS capture (ISTIO_META_DNS_CAPTURE, port 53 to 15053),
//     ISTIO_OUTBOUND_OWNER_GROUPS, UDP, TPROXY marks, excludeInterfaces and
//     kubevirtInterfaces / istio.io/reroute-virtual-interfaces (these are
//     recognized and reported as unsupported warnings).
//   - Istio CNI prefers the sidecar.istio.io/inject label over the
//     annotation; callers that have the pod's labels should copy the label's
//     value over the annotation before calling [ParseTraffic].
//   - iptables' owner match compares the socket's file credentials (fsuid,
//     fsgid, without supplementary groups); the uid and gid passed to
//     CaptureOutbound should be the same.
//
// # Example
//
//	t, warnings, err := istio.ParseTraffic(map[string]string{
//		"sidecar.istio.io/status":                          `{"containers":["istio-proxy"]}`,
//		"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8, 192.168.1.7",
//		"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.10/32",
//		"traffic.sidecar.istio.io/excludeInboundPorts":     "9090",
//	}, istio.DefaultDefaults())
//	// t.Capture == true, t.IncludeOutboundRanges == [10.0.0.0/8 192.168.1.7/32]
//	t.CaptureOutbound(netip.MustParseAddrPort("10.1.2.3:80"), 1000, 1000)    // true, captured
//	t.CaptureOutbound(netip.MustParseAddrPort("10.96.0.10:53"), 1000, 1000)  // false, excluded-range
//	t.CaptureOutbound(netip.MustParseAddrPort("8.8.8.8:443"), 1000, 1000)    // false, not-included
//	t.CaptureOutbound(netip.MustParseAddrPort("10.1.2.3:80"), 1337, 1337)    // false, proxy-uid
//	remote := netip.MustParseAddr("10.2.0.9")
//	t.CaptureInbound(netip.MustParseAddrPort("10.1.0.5:8080"), remote)       // true, captured
//	t.CaptureInbound(netip.MustParseAddrPort("10.1.0.5:9090"), remote)       // false, excluded-inbound-port
//	t.CaptureInbound(netip.MustParseAddrPort("10.1.0.5:15021"), remote)      // false, proxy-port
package istio

// Package istio turns a pod's Istio sidecar traffic settings (its
// annotations, plus mesh-wide [Defaults]) into a validated [Traffic] value
// that the meshsplice datapath programs into the kernel, and defines, once,
// which connections that configuration captures ([Traffic.Decide]). The BPF
// programs mirror it; tests compare the two.
//
// Traffic parsing and the capture decisions are pure (no I/O). The
// configuration Sources read the rest of Istio's configuration: [FileSource]
// from a folder of YAML (standalone), [KubeSource] from the Kubernetes API
// server (informers).
//
// Both sources deliver the security.istio.io PeerAuthentications
// (Config.PeerAuthentications) as Istio stores them; package policy
// resolves their mTLS modes per workload as istiod does. The Kubernetes
// source also says, for every pod IP of the cluster, whether the pod
// surely has no sidecar ([PodIdentity.Plaintext]): not injected
// (no sidecar.istio.io/status), no istio-proxy container (a gateway or
// waypoint deployed without injection still holds an Istio certificate)
// and not being deleted (its IP may already be a new pod's). Only such a
// pod's connections may be refused on a STRICT port; every other source,
// known or not, is left to the sidecar's TLS handshake.
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
//     policy;
//   - the pod is not under Istio's own iptables: the status annotation's
//     initContainers list names istio-init, or meshsplice.io/capture is
//     "iptables". Such a pod ([Traffic.IPTables], mode [ModeIPTables]) is
//     never captured but its sidecar is spliced (REDIRECT mode only).
//
// On Kubernetes, [ClassifyPod] asks more of a pod, as Istio would: the
// istio-proxy sidecar is there (a container, or a native sidecar: an init
// container with restartPolicy: Always), the injecting revision is the one
// the agent follows, the interception mode is REDIRECT (TPROXY is left to
// Istio), and an istio-init container (in the spec or the status list)
// means Istio's own iptables capture it ([PodMesh.Mode] iptables). The
// agent leaves a registered pod of another revision alone ([ForRevision],
// [Config.Revision]).
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
// Every bad item is an error naming its annotation and value; the first 20
// errors and the first 20 warnings are listed, the rest only counted
// ("(N more errors not shown)"), since a pod may carry 10,000 bad entries.
// FuzzAnnotations and FuzzLoad (corpora in testdata/fuzz) hold the parsers
// to that.
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
// # Which connections are captured: [Traffic.Decide]
//
// Decide models istio-iptables' nat rules (REDIRECT mode) for one TCP
// connection ([Conn]): where it goes ([Target]: nowhere, the outbound port
// 15001 or the inbound port 15006) and why ([Reason]). [Traffic.CaptureOutbound]
// and [Traffic.CaptureInbound] are its two common cases. The datapath
// (bpf/) decides the same; e2e tests compare the kernel with Decide.
//
// IPv6 first: istio-iptables writes ip6tables rules only when the pod is
// IPv6-only, or dual-stack with ISTIO_DUAL_STACK ([Defaults.DualStack], from
// the mesh's defaultConfig.proxyMetadata); [Traffic.CaptureIPv6]. Otherwise
// no IPv6 connection of the pod is captured, in or out (ipv6-not-captured).
// IPv4 is always captured. [Traffic.PodIPs] must hold the pod's addresses.
//
// # Connections the pod makes (nat OUTPUT): Conn.Local
//
// Rules are tried in order; the first that matches decides. "Via lo" means a
// loopback destination or one of the pod's own addresses ([Traffic.PodIPs]);
// connect() to 0.0.0.0 or :: goes to 127.0.0.1 or ::1.
//
//  1. pod not captured                                    -> none (not-meshed)
//  2. destination port in excludeOutboundPorts            -> none (excluded-port)
//  3. via lo, from 127.0.0.6 or ::6 (Envoy's inbound
//     passthrough to the app)                             -> none (inbound-passthrough-source)
//  4. proxy uid, via lo, not to 127.0.0.1 / ::1, not to
//     port 15008 (Envoy calling its own pod)              -> inbound (proxy-hairpin)
//  5. via lo, not the proxy uid, unless an include range
//     is loopback ([Traffic.IncludeOutboundLoopback])     -> none (loopback)
//  6. proxy uid                                           -> none (proxy-uid)
//  7. proxy gid: as 4 and 6                               -> inbound (proxy-hairpin) or none (proxy-gid)
//  8. destination 127.0.0.1, ::1                          -> none (loopback)
//  9. destination in an excludeOutboundIPRanges range     -> none (excluded-range)
//  10. destination port in includeOutboundPorts           -> outbound (captured)
//  11. includeOutboundIPRanges is "*" or has a range
//     containing the destination                         -> outbound (captured)
//  12. otherwise                                          -> none (not-included)
//
// So an app calling its own pod IP is never captured (unless an include
// range is loopback: then rules 9-11 judge it, like 127.0.0.2), and neither
// is the connection it makes captured inbound.
//
// A v4-mapped destination (::ffff:10.0.0.1, a dual-stack socket talking IPv4)
// is judged as the IPv4 address; IPv4 ranges never match IPv6 destinations
// and the other way round (::/0 matches no IPv4 address). Exclusions win
// over inclusions whatever the prefix lengths: with includeOutboundIPRanges
// "10.0.0.0/8" and excludeOutboundIPRanges "10.1.0.0/16", 10.1.2.3 is not
// captured and 10.2.0.1 is. Excluded ranges also win over
// includeOutboundPorts: with includeOutboundPorts "5432" and
// excludeOutboundIPRanges "10.1.0.0/16", 10.1.2.3:5432 is not captured
// (istio-iptables' rule order) while 192.0.2.1:5432 is, even if
// includeOutboundIPRanges is "".
//
// # Connections from outside the pod (nat PREROUTING)
//
//  1. pod not captured                                    -> none (not-meshed)
//  2. a source or destination that cannot arrive from
//     outside (loopback, unspecified, the pod's own IPv4
//     address): the kernel drops it                       -> none (martian)
//  3. destination port is one of [ProxyPorts] or the
//     configured inbound/outbound capture port            -> none (proxy-port)
//  4. includeInboundPorts is "*" and the port is in
//     excludeInboundPorts                                 -> none (excluded-inbound-port)
//  5. includeInboundPorts is "*"                          -> inbound (captured)
//  6. port in includeInboundPorts                         -> inbound (captured)
//  7. otherwise                                           -> none (not-included-port)
//
// There is no source rule: the 127.0.0.6 / ::6 exemption holds only over lo
// (rule 3 above). An IPv6 SYN from ::6, or from the pod's own IPv6 address,
// that arrives on eth0 is captured like any other.
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
// The rules above were checked against istio-iptables
// (tools/istio-iptables/pkg/capture/run.go, istio/istio at
// https://github.com/istio/istio/blob/86c9f01fd735fb01d8192f5bcaf0d424afb7f14c/tools/istio-iptables/pkg/capture/run.go)
// and its output for the injector's defaults
// (baseline/testdata/istio-sidecar-v{4,6}.golden). The differences:
//
//   - The loopback exemption that always applies is istio-iptables'
//     ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, 127.0.0.1/32 by default
//     (run.go#L393-L396); we do not read that environment variable.
//   - "Via lo" covers the pod's registered addresses and loopback, not other
//     addresses a pod may add to its interfaces.
//   - istio-iptables only hard-excludes port 15008 inbound (run.go#L258-L260)
//     and the injector adds 15090, 15021 and the status port to
//     excludeInboundPorts, which only applies with "*". We never capture
//     [ProxyPorts] inbound from outside, even when includeInboundPorts lists
//     them.
//   - Istio rejects bare addresses and whitespace in CIDR lists and rejects
//     empty list items in its injector; we accept them.
//   - Not modelled: DNS capture (ISTIO_META_DNS_CAPTURE, port 53 to 15053),
//     ISTIO_OUTBOUND_OWNER_GROUPS, UDP, TPROXY marks, excludeInterfaces and
//     kubevirtInterfaces / istio.io/reroute-virtual-interfaces (these are
//     recognized and reported as unsupported warnings), and a per-pod
//     ISTIO_DUAL_STACK (only the mesh-wide proxyMetadata is read).
//   - Istio CNI prefers the sidecar.istio.io/inject label over the
//     annotation; callers that have the pod's labels should copy the label's
//     value over the annotation before calling [ParseTraffic].
//   - iptables' owner match compares the socket's file credentials (fsuid,
//     fsgid, without supplementary groups), as seen from the user namespace
//     that owns the pod's network namespace; the uid and gid in [Conn] are
//     the same, so for a pod with its own user namespace they are the ids
//     inside it (the datapath maps them to the host's view).
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

package istio

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Istio annotations read by [ParseTraffic].
const (
	AnnotationIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	AnnotationIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
	AnnotationExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	AnnotationIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	AnnotationExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	AnnotationInterceptionMode        = "sidecar.istio.io/interceptionMode"
	AnnotationInject                  = "sidecar.istio.io/inject"
	AnnotationStatus                  = "sidecar.istio.io/status"
	// AnnotationStatusPort moves the sidecar's status (readiness) port; the
	// injector excludes it from inbound capture.
	AnnotationStatusPort = "status.sidecar.istio.io/port"
)

// Istio annotations that are recognized but not implemented by meshsplice.
// [ParseTraffic] reports each one present as a warning.
const (
	AnnotationExcludeInterfaces        = "traffic.sidecar.istio.io/excludeInterfaces"
	AnnotationKubevirtInterfaces       = "traffic.sidecar.istio.io/kubevirtInterfaces"
	AnnotationRerouteVirtualInterfaces = "istio.io/reroute-virtual-interfaces"
)

// meshsplice's own annotations.
const (
	AnnotationCapture   = "meshsplice.io/capture"    // "enabled" (default) | "disabled" | "iptables" (see [Traffic.IPTables])
	AnnotationSplice    = "meshsplice.io/splice"     // "enabled" (default) | "disabled"
	AnnotationAppSplice = "meshsplice.io/app-splice" // "false" (default; Defaults.AppSplice) | "true"
	AnnotationProxyUID  = "meshsplice.io/proxy-uid"  // decimal uid, default Defaults.ProxyUID
	AnnotationProxyGID  = "meshsplice.io/proxy-gid"  // decimal gid, default the uid if overridden, else Defaults.ProxyGID
)

// UnsupportedAnnotations lists the Istio traffic annotations meshsplice
// recognizes but ignores; [ParseTraffic] warns about each one present.
var UnsupportedAnnotations = []string{
	AnnotationExcludeInterfaces,
	AnnotationKubevirtInterfaces,
	AnnotationRerouteVirtualInterfaces,
}

// proxyPorts is the authoritative copy of ProxyPorts, sorted. is_proxy_port
// in bpf/common.h holds the same list (datapath/consts_test.go compares).
var proxyPorts = [...]uint16{
	15000, // Envoy admin
	15001, // outbound capture
	15004, // debug
	15006, // inbound capture
	15008, // HBONE tunnel (istio-iptables always skips it inbound)
	15020, // merged metrics / status (injector's -d default)
	15021, // health checks (injector's -d default)
	15053, // DNS proxy
	15090, // Envoy Prometheus (injector's -d default)
}

// ProxyPorts are the sidecar's own ports. Connections to them are never
// captured inbound, whatever includeInboundPorts says. The decision
// functions use an internal copy: changing this slice changes nothing.
var ProxyPorts = slices.Clone(proxyPorts[:])

func isProxyPort(port uint16) bool {
	_, found := slices.BinarySearch(proxyPorts[:], port)
	return found
}

// Defaults are the mesh-wide settings that apply when a pod has no
// annotation of its own. [DefaultDefaults] returns Istio's; a MeshConfig
// reader (ProxyConfig, values.global.proxy) can supply others. The string
// fields use the annotation syntax.
type Defaults struct {
	ProxyUID, ProxyGID uint32 // 1337, 1337
	OutboundPort       uint16 // 15001, MeshConfig proxyListenPort
	InboundPort        uint16 // 15006, MeshConfig proxyInboundListenPort
	StatusPort         uint16 // 15020, values.global.proxy.statusPort; 0: none
	InterceptionMode   string // "REDIRECT", ProxyConfig interceptionMode
	// DualStack is the proxy's ISTIO_DUAL_STACK (ProxyConfig proxyMetadata):
	// istio-iptables then captures IPv6 in a pod that also has IPv4
	// addresses. See [Traffic.CaptureIPv6].
	DualStack bool

	IncludeOutboundIPRanges string // "*", values.global.proxy.includeIPRanges
	ExcludeOutboundIPRanges string // "", values.global.proxy.excludeIPRanges
	IncludeOutboundPorts    string // "", values.global.proxy.includeOutboundPorts
	ExcludeOutboundPorts    string // "", values.global.proxy.excludeOutboundPorts
	IncludeInboundPorts     string // "*", values.global.proxy.includeInboundPorts
	ExcludeInboundPorts     string // "", values.global.proxy.excludeInboundPorts

	// AppSplice is meshsplice.io/app-splice for a pod that does not set
	// it: false (Istio's defaults know nothing of it), true where the agent
	// found that the node refuses splice(2) reads of spliced sockets
	// (datapath.ReadersGuarded), the one trap an app socket's reader could
	// fall into that meshsplice cannot otherwise keep from hanging.
	AppSplice bool
}

// DefaultDefaults returns Istio's out-of-the-box defaults.
func DefaultDefaults() Defaults {
	return Defaults{
		ProxyUID:                1337,
		ProxyGID:                1337,
		OutboundPort:            15001,
		InboundPort:             15006,
		StatusPort:              15020,
		InterceptionMode:        "REDIRECT",
		IncludeOutboundIPRanges: "*",
		IncludeInboundPorts:     "*",
	}
}

// Traffic is the pod-level capture configuration meshsplice programs into the
// kernel. [ParseTraffic] fills every field even when Capture is false. The
// slices are sorted and free of duplicates; prefixes are masked, and IPv4
// prefixes are never v4-mapped.
type Traffic struct {
	Capture bool // false: leave the pod alone (not meshed, opted out, or interceptionMode NONE)
	// Sidecar: the pod has a sidecar that Istio captures for (injected, not
	// inject=false, not interceptionMode NONE), whether meshsplice captures
	// it (Capture) or Istio's own iptables do (meshsplice.io/capture
	// "disabled", or the node switch off). Its authorization policy is
	// enforced in the kernel either way.
	Sidecar bool
	// IPTables: Istio's own iptables capture the pod (an istio-init
	// container in the sidecar.istio.io/status list, or meshsplice.io/capture
	// "iptables"): meshsplice never captures it (Capture is false) but
	// splices its sidecar's connections with the node's other sidecars.
	IPTables  bool
	Splice    bool // sockmap splice allowed for this pod (never without Capture or IPTables)
	AppSplice bool // the app's own sockets are spliced too (never without Splice; never with IPTables)

	ProxyUID, ProxyGID        uint32
	OutboundPort, InboundPort uint16 // 15001, 15006

	// DualStack is [Defaults.DualStack]; with PodIPs it says whether IPv6
	// is captured at all ([Traffic.CaptureIPv6]).
	DualStack bool
	// PodIPs are the pod's addresses, which ParseTraffic does not know: the
	// caller fills them in. A connection the pod makes to one of them leaves
	// through lo, like one to 127.0.0.2 (see [Traffic.Decide]). Empty: the
	// addresses are unknown, and IPv6 counts as captured.
	PodIPs []netip.Addr

	IncludeAllOutbound    bool           // includeOutboundIPRanges "*"
	IncludeOutboundRanges []netip.Prefix // empty when IncludeAllOutbound
	ExcludeOutboundRanges []netip.Prefix
	// IncludeOutboundLoopback: an includeOutboundIPRanges entry's address is
	// a loopback address (istio-iptables' HasLoopBackIP). Loopback
	// destinations other than 127.0.0.1 and ::1 are then judged by the
	// range and port rules instead of being exempt.
	IncludeOutboundLoopback bool
	IncludeOutboundPorts    []uint16
	ExcludeOutboundPorts    []uint16

	IncludeAllInbound   bool     // includeInboundPorts "*"
	IncludeInboundPorts []uint16 // empty when IncludeAllInbound
	// ExcludeInboundPorts holds excludeInboundPorts plus the status port
	// unless it is one of ProxyPorts. It is empty unless IncludeAllInbound:
	// Istio applies the exclusions only to "*".
	ExcludeInboundPorts []uint16
}

// ParseTraffic validates a pod's annotations and resolves them against d.
// It returns warnings (unsupported or unknown annotations, masked host bits,
// settings that have no effect) and, if any value is invalid, an error
// joining one error per bad item (errors.Join); the Traffic is then the zero
// value, which captures nothing. Every annotation is validated, even when
// the pod is not captured. Values from d are validated when they are used,
// and errors in them name the Defaults field.
func ParseTraffic(annotations map[string]string, d Defaults) (Traffic, []string, error) {
	p := &parser{ann: annotations}
	var t Traffic

	// Is the pod meshed, and does it want us?
	_, injected := annotations[AnnotationStatus]
	istioInit := false
	if injected {
		var status map[string]json.RawMessage
		if err := json.Unmarshal([]byte(annotations[AnnotationStatus]), &status); err != nil {
			p.warnf("%s is not a JSON object; treating the pod as injected anyway", AnnotationStatus)
		}
		istioInit = statusHasIstioInit(status)
	}
	injectOff := false
	if v := strings.TrimSpace(annotations[AnnotationInject]); v != "" {
		if b, err := strconv.ParseBool(v); err != nil {
			p.warnf("%s: %q is not a boolean; ignored", AnnotationInject, v)
		} else {
			injectOff = !b
		}
	}
	mode, modeSrc := p.lookup(AnnotationInterceptionMode, d.InterceptionMode, "Defaults.InterceptionMode")
	interceptNone := false
	switch strings.TrimSpace(mode) {
	case "REDIRECT", "TPROXY":
	case "NONE":
		interceptNone = true
	default:
		p.errorf("%s: %q is not REDIRECT, TPROXY or NONE", modeSrc, mode)
	}
	capture, iptables := true, false
	if v := strings.TrimSpace(annotations[AnnotationCapture]); v == "iptables" {
		iptables = true
	} else {
		capture = p.enum(AnnotationCapture, "enabled", "disabled", true)
	}
	splice := p.enum(AnnotationSplice, "enabled", "disabled", true)
	appIngress := p.enum(AnnotationAppSplice, "true", "false", d.AppSplice)

	t.Sidecar = injected && !injectOff && !interceptNone
	// istio-init ran istio-iptables in the pod: capturing it too would
	// capture its connections twice, whatever the annotation says.
	// Splicing models istio-iptables' REDIRECT (bpf/iptmode.h), not TPROXY.
	redirectMode := strings.TrimSpace(mode) == "REDIRECT"
	t.IPTables = t.Sidecar && redirectMode && (iptables || (istioInit && capture))
	if istioInit && capture && !iptables && annotations[AnnotationCapture] != "" {
		p.warnf("%s: %q: the pod has Istio's %s iptables, so meshsplice does not capture it", AnnotationCapture, annotations[AnnotationCapture], InitContainer)
	}
	t.Capture = t.Sidecar && capture && !iptables && !istioInit
	t.Splice = (t.Capture || t.IPTables) && splice
	t.AppSplice = t.Capture && t.Splice && appIngress
	_, appSet := annotations[AnnotationAppSplice]
	if appSet && appIngress && !splice {
		p.warnf("%s: \"true\" has no effect with %s: \"disabled\"", AnnotationAppSplice, AnnotationSplice)
	} else if appSet && appIngress && t.IPTables {
		p.warnf("%s: \"true\" has no effect on a pod under Istio's iptables: its app reaches the sidecar through NAT", AnnotationAppSplice)
	}

	// Proxy identity. Like istio-iptables' -g, the gid follows the uid.
	t.DualStack = d.DualStack
	t.ProxyUID = d.ProxyUID
	uidSrc := "Defaults.ProxyUID"
	if v, ok := annotations[AnnotationProxyUID]; ok {
		t.ProxyUID, uidSrc = p.id(AnnotationProxyUID, v, "uid"), AnnotationProxyUID
	}
	t.ProxyGID = d.ProxyGID
	gidSrc := "Defaults.ProxyGID"
	if v, ok := annotations[AnnotationProxyGID]; ok {
		t.ProxyGID, gidSrc = p.id(AnnotationProxyGID, v, "gid"), AnnotationProxyGID
	} else if uidSrc == AnnotationProxyUID {
		t.ProxyGID, gidSrc = t.ProxyUID, AnnotationProxyUID
	}
	if t.ProxyUID == 0 && p.idOK(uidSrc) {
		p.warnf("%s: 0 is root: every root process in the pod bypasses the sidecar", uidSrc)
	}
	if t.ProxyGID == 0 && p.idOK(gidSrc) {
		p.warnf("%s: 0 is root's group: every process in group 0 bypasses the sidecar", gidSrc)
	}

	t.OutboundPort, t.InboundPort = d.OutboundPort, d.InboundPort
	if t.OutboundPort == 0 {
		p.errorf("Defaults.OutboundPort: 0 is not a port (1-65535)")
	}
	if t.InboundPort == 0 {
		p.errorf("Defaults.InboundPort: 0 is not a port (1-65535)")
	}
	if t.OutboundPort != 0 && t.OutboundPort == t.InboundPort {
		p.errorf("Defaults.OutboundPort and Defaults.InboundPort are both %d", t.OutboundPort)
	}

	// Outbound.
	v, src := p.lookup(AnnotationIncludeOutboundIPRanges, d.IncludeOutboundIPRanges, "Defaults.IncludeOutboundIPRanges")
	t.IncludeAllOutbound, t.IncludeOutboundRanges, t.IncludeOutboundLoopback = p.ranges(src, v, true)
	v, src = p.lookup(AnnotationExcludeOutboundIPRanges, d.ExcludeOutboundIPRanges, "Defaults.ExcludeOutboundIPRanges")
	_, t.ExcludeOutboundRanges, _ = p.ranges(src, v, false)
	v, src = p.lookup(AnnotationIncludeOutboundPorts, d.IncludeOutboundPorts, "Defaults.IncludeOutboundPorts")
	_, t.IncludeOutboundPorts = p.ports(src, v, false)
	v, src = p.lookup(AnnotationExcludeOutboundPorts, d.ExcludeOutboundPorts, "Defaults.ExcludeOutboundPorts")
	_, t.ExcludeOutboundPorts = p.ports(src, v, false)

	// Inbound.
	v, src = p.lookup(AnnotationIncludeInboundPorts, d.IncludeInboundPorts, "Defaults.IncludeInboundPorts")
	t.IncludeAllInbound, t.IncludeInboundPorts = p.ports(src, v, true)
	v, src = p.lookup(AnnotationExcludeInboundPorts, d.ExcludeInboundPorts, "Defaults.ExcludeInboundPorts")
	_, t.ExcludeInboundPorts = p.ports(src, v, false)
	podExcludesInbound := src == AnnotationExcludeInboundPorts && len(t.ExcludeInboundPorts) > 0
	statusPort := d.StatusPort
	if v, ok := annotations[AnnotationStatusPort]; ok {
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 16)
		if err != nil {
			p.errorf("%s: %q is not a port (0-65535)", AnnotationStatusPort, v)
		}
		statusPort = uint16(n)
	}
	if statusPort != 0 && !isProxyPort(statusPort) {
		t.ExcludeInboundPorts = insertPort(t.ExcludeInboundPorts, statusPort)
	}
	if !t.IncludeAllInbound {
		if podExcludesInbound {
			p.warnf("%s has no effect unless %s is \"*\"; ignored", AnnotationExcludeInboundPorts, AnnotationIncludeInboundPorts)
		}
		t.ExcludeInboundPorts = nil
	}

	// Unsupported and unknown annotations.
	for _, name := range UnsupportedAnnotations {
		if _, ok := annotations[name]; ok {
			p.warnf("%s is not supported by meshsplice; ignored", name)
		}
	}
	var unknown []string
	for name := range annotations {
		if strings.HasPrefix(name, "traffic.sidecar.istio.io/") && !knownTrafficAnnotations[name] {
			unknown = append(unknown, name)
		}
	}
	slices.Sort(unknown)
	for _, name := range unknown {
		p.warnf("%s is not an Istio traffic annotation; ignored", name)
	}

	p.sum()
	if len(p.errs) > 0 {
		return Traffic{}, p.warns, errors.Join(p.errs...)
	}
	return t, p.warns, nil
}

var knownTrafficAnnotations = map[string]bool{
	AnnotationIncludeOutboundIPRanges: true,
	AnnotationExcludeOutboundIPRanges: true,
	AnnotationIncludeOutboundPorts:    true,
	AnnotationExcludeOutboundPorts:    true,
	AnnotationIncludeInboundPorts:     true,
	AnnotationExcludeInboundPorts:     true,
	AnnotationExcludeInterfaces:       true,
	AnnotationKubevirtInterfaces:      true,
}

// parser collects the warnings and errors of one ParseTraffic call.
type parser struct {
	ann      map[string]string
	warns    []string
	errs     []error
	badIDSrc []string // sources whose uid/gid did not parse
	// moreWarns, moreErrs count what was not reported (maxReported).
	moreWarns, moreErrs int
}

func (p *parser) warnf(format string, args ...any) {
	if len(p.warns) >= maxReported {
		p.moreWarns++
		return
	}
	p.warns = append(p.warns, fmt.Sprintf(format, args...))
}

func (p *parser) errorf(format string, args ...any) {
	if len(p.errs) >= maxReported {
		p.moreErrs++
		return
	}
	p.errs = append(p.errs, fmt.Errorf(format, args...))
}

// lookup returns the annotation's value and name if it is present (even
// empty), else def and defName.
func (p *parser) lookup(name, def, defName string) (value, source string) {
	if v, ok := p.ann[name]; ok {
		return v, name
	}
	return def, defName
}

// enum parses a two-valued meshsplice annotation; it returns whether the
// value is yes, or def if the annotation is absent or invalid.
func (p *parser) enum(name, yes, no string, def bool) bool {
	v, ok := p.ann[name]
	if !ok {
		return def
	}
	switch strings.TrimSpace(v) {
	case yes:
		return true
	case no:
		return false
	}
	p.errorf("%s: %q is not %q or %q", name, v, yes, no)
	return def
}

// id parses a uid or gid annotation: a decimal number below 2^32-1, which
// the kernel reserves to mean "no id".
func (p *parser) id(name, v, what string) uint32 {
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
	if err != nil || n == 1<<32-1 {
		p.errorf("%s: %q is not a %s (0-4294967294)", name, v, what)
		p.badIDSrc = append(p.badIDSrc, name)
		return 0
	}
	return uint32(n)
}

func (p *parser) idOK(source string) bool { return !slices.Contains(p.badIDSrc, source) }

// items splits a comma-separated list, trimming whitespace and dropping
// empty items.
func items(v string) []string {
	var out []string
	for item := range strings.SplitSeq(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// wildcard reports whether list is the wildcard, and reports "*" mixed with
// other items. It returns false for "*" where no wildcard is allowed, so
// that the item is then rejected as a bad port or range.
func (p *parser) wildcard(source, value string, list []string, allowed bool) bool {
	if !allowed || !slices.Contains(list, "*") {
		return false
	}
	if len(list) > 1 {
		p.errorf("%s: \"*\" must stand alone, not in %q", source, value)
	}
	return true
}

// ports parses a port list; all reports "*" (only when wildcard is allowed).
func (p *parser) ports(source, value string, wildcard bool) (all bool, ports []uint16) {
	list := items(value)
	if p.wildcard(source, value, list, wildcard) {
		return true, nil
	}
	for _, item := range list {
		n, err := strconv.ParseUint(item, 10, 16)
		if err != nil || n == 0 {
			p.errorf("%s: %q is not a port (1-65535)", source, item)
			continue
		}
		ports = append(ports, uint16(n))
	}
	slices.Sort(ports)
	return false, slices.Compact(ports)
}

// ranges parses a CIDR list; all reports "*" (only when wildcard is
// allowed), loopback whether an entry's address, as written, is loopback.
func (p *parser) ranges(source, value string, wildcard bool) (all bool, prefixes []netip.Prefix, loopback bool) {
	list := items(value)
	if p.wildcard(source, value, list, wildcard) {
		return true, nil, false
	}
	for _, item := range list {
		var pfx netip.Prefix
		var err error
		if strings.Contains(item, "/") {
			pfx, err = netip.ParsePrefix(item)
		} else {
			var addr netip.Addr
			addr, err = netip.ParseAddr(item)
			if err == nil && addr.Zone() != "" {
				err = errors.New("zone")
			}
			pfx = netip.PrefixFrom(addr, addr.BitLen())
		}
		if err != nil {
			p.errorf("%s: %q is not an IP range (CIDR or address)", source, item)
			continue
		}
		if pfx.Addr().IsLoopback() {
			loopback = true
		}
		if pfx.Addr().Is4In6() && pfx.Bits() >= 96 {
			pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
			p.warnf("%s: %q is an IPv4-mapped range; using %s (v4-mapped destinations are matched as IPv4)",
				source, item, pfx.Masked())
		}
		if m := pfx.Masked(); m != pfx {
			p.warnf("%s: %q has host bits set; using %s", source, item, m)
			pfx = m
		}
		prefixes = append(prefixes, pfx)
	}
	slices.SortFunc(prefixes, comparePrefix)
	return false, slices.Compact(prefixes), loopback
}

// comparePrefix orders IPv4 before IPv6, then by address, then shorter
// prefixes first.
func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func insertPort(ports []uint16, port uint16) []uint16 {
	i, found := slices.BinarySearch(ports, port)
	if found {
		return ports
	}
	return slices.Insert(ports, i, port)
}

// statusHasIstioInit says whether the injector's sidecar.istio.io/status
// lists the istio-init container: istio-iptables then captures the pod
// (istio-validation, istio-cni's check, does not: meshsplice stands in for
// istio-cni).
func statusHasIstioInit(status map[string]json.RawMessage) bool {
	var inits []string
	if json.Unmarshal(status["initContainers"], &inits) != nil {
		return false
	}
	return slices.Contains(inits, InitContainer)
}

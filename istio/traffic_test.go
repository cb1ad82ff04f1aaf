package istio

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

const statusJSON = `{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null}`

// pod returns the annotations of an injected pod plus kv pairs.
func pod(kv ...string) map[string]string {
	return withKV(map[string]string{AnnotationStatus: statusJSON}, kv...)
}

// bare returns annotations without the injector's status annotation.
func bare(kv ...string) map[string]string { return withKV(map[string]string{}, kv...) }

func withKV(m map[string]string, kv ...string) map[string]string {
	if len(kv)%2 != 0 {
		panic("odd kv")
	}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// base is what ParseTraffic returns for pod() with DefaultDefaults().
func base() Traffic {
	return Traffic{
		Capture:            true,
		Sidecar:            true,
		Splice:             true,
		ProxyUID:           1337,
		ProxyGID:           1337,
		OutboundPort:       15001,
		InboundPort:        15006,
		IncludeAllOutbound: true,
		IncludeAllInbound:  true,
	}
}

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestDefaultDefaults(t *testing.T) {
	want := Defaults{
		ProxyUID: 1337, ProxyGID: 1337,
		OutboundPort: 15001, InboundPort: 15006, StatusPort: 15020,
		InterceptionMode:        "REDIRECT",
		IncludeOutboundIPRanges: "*",
		IncludeInboundPorts:     "*",
	}
	if got := DefaultDefaults(); got != want {
		t.Fatalf("DefaultDefaults() = %+v, want %+v", got, want)
	}
}

func TestProxyPorts(t *testing.T) {
	want := []uint16{15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090}
	if !slices.Equal(ProxyPorts, want) {
		t.Fatalf("ProxyPorts = %v, want %v", ProxyPorts, want)
	}
	if !slices.IsSorted(proxyPorts[:]) {
		t.Fatal("proxyPorts is not sorted; isProxyPort needs it sorted")
	}
	// The exported slice is a copy: changing it changes no decision.
	saved := ProxyPorts[0]
	ProxyPorts[0] = 1
	defer func() { ProxyPorts[0] = saved }()
	if !isProxyPort(15000) || isProxyPort(1) {
		t.Fatal("isProxyPort follows the exported ProxyPorts slice")
	}
}

func TestParseTraffic(t *testing.T) {
	type tc struct {
		name     string
		ann      map[string]string
		defaults func(*Defaults)
		want     func(*Traffic) // applied to base(); nil: base() unchanged
		warnings []string
		errors   []string // one line per joined error; Traffic must then be zero
	}
	notCaptured := func(t *Traffic) { t.Capture, t.Sidecar, t.Splice = false, false, false }
	// optedOut: the sidecar is there, Istio's own rules capture for it.
	optedOut := func(t *Traffic) { t.Capture, t.Splice = false, false }
	tests := []tc{
		// Meshed or not.
		{name: "injected pod, no annotations", ann: pod()},
		{name: "not injected: no status annotation", ann: bare(), want: notCaptured},
		{name: "status empty string still means injected", ann: bare(AnnotationStatus, ""),
			warnings: []string{`sidecar.istio.io/status is not a JSON object; treating the pod as injected anyway`}},
		{name: "status not JSON", ann: bare(AnnotationStatus, "injected"),
			warnings: []string{`sidecar.istio.io/status is not a JSON object; treating the pod as injected anyway`}},
		{name: "status JSON array", ann: bare(AnnotationStatus, `["istio-proxy"]`),
			warnings: []string{`sidecar.istio.io/status is not a JSON object; treating the pod as injected anyway`}},
		{name: "inject false", ann: pod(AnnotationInject, "false"), want: notCaptured},
		{name: "inject 0 (strconv.ParseBool, like Istio CNI)", ann: pod(AnnotationInject, "0"), want: notCaptured},
		{name: "inject FALSE with spaces", ann: pod(AnnotationInject, " FALSE "), want: notCaptured},
		{name: "inject false, not injected", ann: bare(AnnotationInject, "false"), want: notCaptured},
		{name: "inject true", ann: pod(AnnotationInject, "true")},
		{name: "inject true does not make a pod injected", ann: bare(AnnotationInject, "true"), want: notCaptured},
		{name: "inject empty is ignored silently", ann: pod(AnnotationInject, "")},
		{name: "inject not a boolean", ann: pod(AnnotationInject, "maybe"),
			warnings: []string{`sidecar.istio.io/inject: "maybe" is not a boolean; ignored`}},

		// interceptionMode.
		{name: "interceptionMode REDIRECT", ann: pod(AnnotationInterceptionMode, "REDIRECT")},
		{name: "interceptionMode TPROXY", ann: pod(AnnotationInterceptionMode, "TPROXY")},
		{name: "interceptionMode NONE", ann: pod(AnnotationInterceptionMode, "NONE"), want: notCaptured},
		{name: "interceptionMode lower case", ann: pod(AnnotationInterceptionMode, "redirect"),
			errors: []string{`sidecar.istio.io/interceptionMode: "redirect" is not REDIRECT, TPROXY or NONE`}},
		{name: "interceptionMode empty", ann: pod(AnnotationInterceptionMode, ""),
			errors: []string{`sidecar.istio.io/interceptionMode: "" is not REDIRECT, TPROXY or NONE`}},
		{name: "mesh default interceptionMode NONE", ann: pod(),
			defaults: func(d *Defaults) { d.InterceptionMode = "NONE" }, want: notCaptured},
		{name: "annotation overrides mesh NONE", ann: pod(AnnotationInterceptionMode, "REDIRECT"),
			defaults: func(d *Defaults) { d.InterceptionMode = "NONE" }},
		{name: "bad mesh default interceptionMode", ann: pod(),
			defaults: func(d *Defaults) { d.InterceptionMode = "IPTABLES" },
			errors:   []string{`Defaults.InterceptionMode: "IPTABLES" is not REDIRECT, TPROXY or NONE`}},

		// meshsplice.io/capture, splice, app-splice.
		{name: "capture enabled", ann: pod(AnnotationCapture, "enabled")},
		{name: "capture disabled", ann: pod(AnnotationCapture, "disabled"), want: optedOut},
		{name: "capture bad", ann: pod(AnnotationCapture, "off"),
			errors: []string{`meshsplice.io/capture: "off" is not "enabled" or "disabled"`}},
		{name: "splice enabled", ann: pod(AnnotationSplice, "enabled")},
		{name: "splice disabled keeps capture", ann: pod(AnnotationSplice, "disabled"),
			want: func(t *Traffic) { t.Splice = false }},
		{name: "splice bad", ann: pod(AnnotationSplice, "no"),
			errors: []string{`meshsplice.io/splice: "no" is not "enabled" or "disabled"`}},
		{name: "app-splice true", ann: pod(AnnotationAppSplice, "true"),
			want: func(t *Traffic) { t.AppSplice = true }},
		{name: "app-splice false", ann: pod(AnnotationAppSplice, "false")},
		{name: "app-splice without splice", ann: pod(AnnotationAppSplice, "true", AnnotationSplice, "disabled"),
			want:     func(t *Traffic) { t.Splice = false },
			warnings: []string{`meshsplice.io/app-splice: "true" has no effect with meshsplice.io/splice: "disabled"`}},
		{name: "app-splice on a pod not captured", ann: pod(AnnotationAppSplice, "true", AnnotationCapture, "disabled"),
			want: optedOut},
		{name: "app-splice bad", ann: pod(AnnotationAppSplice, "yes"),
			errors: []string{`meshsplice.io/app-splice: "yes" is not "true" or "false"`}},

		// Proxy uid/gid.
		{name: "proxy-uid overrides, gid follows", ann: pod(AnnotationProxyUID, "2000"),
			want: func(t *Traffic) { t.ProxyUID, t.ProxyGID = 2000, 2000 }},
		{name: "proxy-uid and proxy-gid", ann: pod(AnnotationProxyUID, " 2000 ", AnnotationProxyGID, "3000"),
			want: func(t *Traffic) { t.ProxyUID, t.ProxyGID = 2000, 3000 }},
		{name: "proxy-gid only", ann: pod(AnnotationProxyGID, "3000"),
			want: func(t *Traffic) { t.ProxyGID = 3000 }},
		{name: "proxy-uid max", ann: pod(AnnotationProxyUID, "4294967294"),
			want: func(t *Traffic) { t.ProxyUID, t.ProxyGID = 4294967294, 4294967294 }},
		{name: "mesh default uid/gid", ann: pod(),
			defaults: func(d *Defaults) { d.ProxyUID, d.ProxyGID = 101, 102 },
			want:     func(t *Traffic) { t.ProxyUID, t.ProxyGID = 101, 102 }},
		{name: "proxy-uid 0 warns, gid follows", ann: pod(AnnotationProxyUID, "0"),
			want: func(t *Traffic) { t.ProxyUID, t.ProxyGID = 0, 0 },
			warnings: []string{
				`meshsplice.io/proxy-uid: 0 is root: every root process in the pod bypasses the sidecar`,
				`meshsplice.io/proxy-uid: 0 is root's group: every process in group 0 bypasses the sidecar`,
			}},
		{name: "proxy-gid 0 warns", ann: pod(AnnotationProxyGID, "0"),
			want:     func(t *Traffic) { t.ProxyGID = 0 },
			warnings: []string{`meshsplice.io/proxy-gid: 0 is root's group: every process in group 0 bypasses the sidecar`}},
		{name: "mesh default uid 0 warns", ann: pod(),
			defaults: func(d *Defaults) { d.ProxyUID = 0 },
			want:     func(t *Traffic) { t.ProxyUID = 0 },
			warnings: []string{`Defaults.ProxyUID: 0 is root: every root process in the pod bypasses the sidecar`}},
		{name: "proxy-uid not a number", ann: pod(AnnotationProxyUID, "istio-proxy"),
			errors: []string{`meshsplice.io/proxy-uid: "istio-proxy" is not a uid (0-4294967294)`}},
		{name: "proxy-uid negative", ann: pod(AnnotationProxyUID, "-1"),
			errors: []string{`meshsplice.io/proxy-uid: "-1" is not a uid (0-4294967294)`}},
		{name: "proxy-uid is the kernel's no-uid", ann: pod(AnnotationProxyUID, "4294967295"),
			errors: []string{`meshsplice.io/proxy-uid: "4294967295" is not a uid (0-4294967294)`}},
		{name: "proxy-uid too big", ann: pod(AnnotationProxyUID, "4294967296"),
			errors: []string{`meshsplice.io/proxy-uid: "4294967296" is not a uid (0-4294967294)`}},
		{name: "proxy-uid empty", ann: pod(AnnotationProxyUID, ""),
			errors: []string{`meshsplice.io/proxy-uid: "" is not a uid (0-4294967294)`}},
		{name: "proxy-gid bad", ann: pod(AnnotationProxyGID, "1337x"),
			errors: []string{`meshsplice.io/proxy-gid: "1337x" is not a gid (0-4294967294)`}},

		// Mesh-wide ports.
		{name: "mesh capture ports", ann: pod(),
			defaults: func(d *Defaults) { d.OutboundPort, d.InboundPort = 16001, 16006 },
			want:     func(t *Traffic) { t.OutboundPort, t.InboundPort = 16001, 16006 }},
		{name: "zero capture ports", ann: pod(),
			defaults: func(d *Defaults) { d.OutboundPort, d.InboundPort = 0, 0 },
			errors: []string{
				`Defaults.OutboundPort: 0 is not a port (1-65535)`,
				`Defaults.InboundPort: 0 is not a port (1-65535)`,
			}},
		{name: "same capture ports", ann: pod(),
			defaults: func(d *Defaults) { d.OutboundPort, d.InboundPort = 15001, 15001 },
			errors:   []string{`Defaults.OutboundPort and Defaults.InboundPort are both 15001`}},

		// includeOutboundIPRanges.
		{name: "include ranges: whitespace, empty items, bare IPs, duplicates, sorted",
			ann: pod(AnnotationIncludeOutboundIPRanges, " 2001:db8::/32 ,10.0.0.0/8,, 192.168.1.7,10.0.0.0/8 , 172.16.0.0/12,2001:db8::1"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.0.0.0/8", "172.16.0.0/12", "192.168.1.7/32", "2001:db8::/32", "2001:db8::1/128")
			}},
		{name: "include ranges: same address, shorter prefix first",
			ann: pod(AnnotationIncludeOutboundIPRanges, "10.0.0.0/16,10.0.0.0/8"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.0.0.0/8", "10.0.0.0/16")
			}},
		{name: "include ranges wildcard with spaces", ann: pod(AnnotationIncludeOutboundIPRanges, " * ")},
		{name: "include ranges wildcard with empty items", ann: pod(AnnotationIncludeOutboundIPRanges, ",*,")},
		{name: "include ranges empty: capture by port only", ann: pod(AnnotationIncludeOutboundIPRanges, ""),
			want: func(t *Traffic) { t.IncludeAllOutbound = false }},
		{name: "include ranges only commas", ann: pod(AnnotationIncludeOutboundIPRanges, " , ,"),
			want: func(t *Traffic) { t.IncludeAllOutbound = false }},
		{name: "include ranges from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.IncludeOutboundIPRanges = "10.96.0.0/12" },
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.96.0.0/12")
			}},
		{name: "include ranges annotation overrides mesh default", ann: pod(AnnotationIncludeOutboundIPRanges, "*"),
			defaults: func(d *Defaults) { d.IncludeOutboundIPRanges = "10.96.0.0/12" }},
		{name: "include ranges wildcard mixed", ann: pod(AnnotationIncludeOutboundIPRanges, "*,10.0.0.0/8"),
			errors: []string{`traffic.sidecar.istio.io/includeOutboundIPRanges: "*" must stand alone, not in "*,10.0.0.0/8"`}},
		{name: "include ranges bad items, all reported",
			ann: pod(AnnotationIncludeOutboundIPRanges, "10.0.0.0/33,10.0.0.0 /8,fe80::1%eth0,fe80::/10%eth0,10.0.0,2001:db8::/129,example.com,10.0.0.0/8"),
			errors: []string{
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0.0/33" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0.0 /8" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "fe80::1%eth0" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "fe80::/10%eth0" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "2001:db8::/129" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "example.com" is not an IP range (CIDR or address)`,
			}},
		{name: "include ranges host bits masked with warnings",
			ann: pod(AnnotationIncludeOutboundIPRanges, "10.1.2.3/8,2001:db8::1/32,10.0.0.0/8"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.0.0.0/8", "2001:db8::/32")
			},
			warnings: []string{
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "10.1.2.3/8" has host bits set; using 10.0.0.0/8`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "2001:db8::1/32" has host bits set; using 2001:db8::/32`,
			}},
		{name: "include ranges v4-mapped become IPv4",
			ann: pod(AnnotationIncludeOutboundIPRanges, "::ffff:10.1.0.0/112,::ffff:192.168.1.7"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.1.0.0/16", "192.168.1.7/32")
			},
			warnings: []string{
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "::ffff:10.1.0.0/112" is an IPv4-mapped range; using 10.1.0.0/16 (v4-mapped destinations are matched as IPv4)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "::ffff:192.168.1.7" is an IPv4-mapped range; using 192.168.1.7/32 (v4-mapped destinations are matched as IPv4)`,
			}},
		{name: "include ranges v4-mapped with host bits",
			ann: pod(AnnotationIncludeOutboundIPRanges, "::ffff:10.1.2.3/104"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.0.0.0/8")
			},
			warnings: []string{
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "::ffff:10.1.2.3/104" is an IPv4-mapped range; using 10.0.0.0/8 (v4-mapped destinations are matched as IPv4)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "::ffff:10.1.2.3/104" has host bits set; using 10.0.0.0/8`,
			}},
		{name: "include ranges wider than the v4-mapped block stay IPv6",
			ann: pod(AnnotationIncludeOutboundIPRanges, "::/0"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("::/0")
			}},
		{name: "include ranges loopback", ann: pod(AnnotationIncludeOutboundIPRanges, "127.0.0.0/8"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("127.0.0.0/8")
				t.IncludeOutboundLoopback = true
			}},
		{name: "include ranges loopback judged as written, like istio-iptables",
			ann: pod(AnnotationIncludeOutboundIPRanges, "127.5.5.5/4"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("112.0.0.0/4")
				t.IncludeOutboundLoopback = true
			},
			warnings: []string{`traffic.sidecar.istio.io/includeOutboundIPRanges: "127.5.5.5/4" has host bits set; using 112.0.0.0/4`}},
		{name: "include ranges covering loopback without a loopback address",
			ann: pod(AnnotationIncludeOutboundIPRanges, "0.0.0.0/0"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("0.0.0.0/0")
			}},
		{name: "include ranges IPv6 loopback", ann: pod(AnnotationIncludeOutboundIPRanges, "::1"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("::1/128")
				t.IncludeOutboundLoopback = true
			}},
		{name: "include ranges v4-mapped loopback", ann: pod(AnnotationIncludeOutboundIPRanges, "::ffff:127.0.0.53"),
			want: func(t *Traffic) {
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("127.0.0.53/32")
				t.IncludeOutboundLoopback = true
			},
			warnings: []string{`traffic.sidecar.istio.io/includeOutboundIPRanges: "::ffff:127.0.0.53" is an IPv4-mapped range; using 127.0.0.53/32 (v4-mapped destinations are matched as IPv4)`}},

		// excludeOutboundIPRanges.
		{name: "exclude ranges", ann: pod(AnnotationExcludeOutboundIPRanges, "169.254.169.254, fd00::/8,10.96.0.10/32"),
			want: func(t *Traffic) {
				t.ExcludeOutboundRanges = pfx("10.96.0.10/32", "169.254.169.254/32", "fd00::/8")
			}},
		{name: "exclude ranges from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.ExcludeOutboundIPRanges = "169.254.169.254/32" },
			want:     func(t *Traffic) { t.ExcludeOutboundRanges = pfx("169.254.169.254/32") }},
		{name: "exclude ranges empty annotation overrides mesh default", ann: pod(AnnotationExcludeOutboundIPRanges, ""),
			defaults: func(d *Defaults) { d.ExcludeOutboundIPRanges = "169.254.169.254/32" }},
		{name: "exclude ranges loopback does not set IncludeOutboundLoopback",
			ann:  pod(AnnotationExcludeOutboundIPRanges, "127.0.0.0/8"),
			want: func(t *Traffic) { t.ExcludeOutboundRanges = pfx("127.0.0.0/8") }},
		{name: "exclude ranges wildcard is not allowed", ann: pod(AnnotationExcludeOutboundIPRanges, "*"),
			errors: []string{`traffic.sidecar.istio.io/excludeOutboundIPRanges: "*" is not an IP range (CIDR or address)`}},
		{name: "exclude ranges masked", ann: pod(AnnotationExcludeOutboundIPRanges, "10.96.0.10/12"),
			want:     func(t *Traffic) { t.ExcludeOutboundRanges = pfx("10.96.0.0/12") },
			warnings: []string{`traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.10/12" has host bits set; using 10.96.0.0/12`}},
		{name: "exclude ranges bad", ann: pod(AnnotationExcludeOutboundIPRanges, "10.0.0.0/8,300.0.0.1"),
			errors: []string{`traffic.sidecar.istio.io/excludeOutboundIPRanges: "300.0.0.1" is not an IP range (CIDR or address)`}},

		// includeOutboundPorts / excludeOutboundPorts.
		{name: "include outbound ports", ann: pod(AnnotationIncludeOutboundPorts, "8080, 443,80,,443 ,1,65535"),
			want: func(t *Traffic) { t.IncludeOutboundPorts = []uint16{1, 80, 443, 8080, 65535} }},
		{name: "include outbound ports leading zeros", ann: pod(AnnotationIncludeOutboundPorts, "0080"),
			want: func(t *Traffic) { t.IncludeOutboundPorts = []uint16{80} }},
		{name: "include outbound ports from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.IncludeOutboundPorts = "5432" },
			want:     func(t *Traffic) { t.IncludeOutboundPorts = []uint16{5432} }},
		{name: "include outbound ports wildcard is not allowed", ann: pod(AnnotationIncludeOutboundPorts, "*"),
			errors: []string{`traffic.sidecar.istio.io/includeOutboundPorts: "*" is not a port (1-65535)`}},
		{name: "include outbound ports bad, all reported",
			ann: pod(AnnotationIncludeOutboundPorts, "0,70000,-1,+80,http,80-90,8 0,80"),
			errors: []string{
				`traffic.sidecar.istio.io/includeOutboundPorts: "0" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "70000" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "-1" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "+80" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "http" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "80-90" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "8 0" is not a port (1-65535)`,
			}},
		{name: "exclude outbound ports", ann: pod(AnnotationExcludeOutboundPorts, "3306, 6379,3306"),
			want: func(t *Traffic) { t.ExcludeOutboundPorts = []uint16{3306, 6379} }},
		{name: "exclude outbound ports from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.ExcludeOutboundPorts = "15020" },
			want:     func(t *Traffic) { t.ExcludeOutboundPorts = []uint16{15020} }},
		{name: "exclude outbound ports out of range", ann: pod(AnnotationExcludeOutboundPorts, "70000"),
			errors: []string{`traffic.sidecar.istio.io/excludeOutboundPorts: "70000" is not a port (1-65535)`}},
		{name: "exclude outbound ports wildcard is not allowed", ann: pod(AnnotationExcludeOutboundPorts, "*"),
			errors: []string{`traffic.sidecar.istio.io/excludeOutboundPorts: "*" is not a port (1-65535)`}},

		// includeInboundPorts / excludeInboundPorts / status port.
		{name: "include inbound ports", ann: pod(AnnotationIncludeInboundPorts, "9080, 8080,9080"),
			want: func(t *Traffic) {
				t.IncludeAllInbound = false
				t.IncludeInboundPorts = []uint16{8080, 9080}
			}},
		{name: "include inbound ports empty: no inbound capture", ann: pod(AnnotationIncludeInboundPorts, ""),
			want: func(t *Traffic) { t.IncludeAllInbound = false }},
		{name: "include inbound ports wildcard", ann: pod(AnnotationIncludeInboundPorts, "*")},
		{name: "include inbound ports from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.IncludeInboundPorts = "8080" },
			want: func(t *Traffic) {
				t.IncludeAllInbound = false
				t.IncludeInboundPorts = []uint16{8080}
			}},
		{name: "include inbound ports wildcard mixed", ann: pod(AnnotationIncludeInboundPorts, "*,8080"),
			errors: []string{`traffic.sidecar.istio.io/includeInboundPorts: "*" must stand alone, not in "*,8080"`}},
		{name: "include inbound ports wildcard twice", ann: pod(AnnotationIncludeInboundPorts, "*,*"),
			errors: []string{`traffic.sidecar.istio.io/includeInboundPorts: "*" must stand alone, not in "*,*"`}},
		{name: "include inbound ports bad", ann: pod(AnnotationIncludeInboundPorts, "8080,99999"),
			errors: []string{`traffic.sidecar.istio.io/includeInboundPorts: "99999" is not a port (1-65535)`}},
		{name: "exclude inbound ports", ann: pod(AnnotationExcludeInboundPorts, "9090 ,22,9090"),
			want: func(t *Traffic) { t.ExcludeInboundPorts = []uint16{22, 9090} }},
		{name: "exclude inbound ports from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.ExcludeInboundPorts = "22" },
			want:     func(t *Traffic) { t.ExcludeInboundPorts = []uint16{22} }},
		{name: "exclude inbound ports ignored without wildcard, with warning",
			ann: pod(AnnotationIncludeInboundPorts, "8080", AnnotationExcludeInboundPorts, "8080,9090"),
			want: func(t *Traffic) {
				t.IncludeAllInbound = false
				t.IncludeInboundPorts = []uint16{8080}
			},
			warnings: []string{`traffic.sidecar.istio.io/excludeInboundPorts has no effect unless traffic.sidecar.istio.io/includeInboundPorts is "*"; ignored`}},
		{name: "mesh default exclusions ignored without wildcard, silently",
			ann:      pod(AnnotationIncludeInboundPorts, "8080"),
			defaults: func(d *Defaults) { d.ExcludeInboundPorts = "22" },
			want: func(t *Traffic) {
				t.IncludeAllInbound = false
				t.IncludeInboundPorts = []uint16{8080}
			}},
		{name: "exclude inbound ports wildcard is not allowed", ann: pod(AnnotationExcludeInboundPorts, "*"),
			errors: []string{`traffic.sidecar.istio.io/excludeInboundPorts: "*" is not a port (1-65535)`}},
		{name: "exclude inbound ports bad", ann: pod(AnnotationExcludeInboundPorts, "0"),
			errors: []string{`traffic.sidecar.istio.io/excludeInboundPorts: "0" is not a port (1-65535)`}},
		{name: "status port moved is excluded", ann: pod(AnnotationStatusPort, "15999", AnnotationExcludeInboundPorts, "22"),
			want: func(t *Traffic) { t.ExcludeInboundPorts = []uint16{22, 15999} }},
		{name: "status port already excluded", ann: pod(AnnotationStatusPort, "15999", AnnotationExcludeInboundPorts, "15999"),
			want: func(t *Traffic) { t.ExcludeInboundPorts = []uint16{15999} }},
		{name: "status port 0: none", ann: pod(AnnotationStatusPort, "0")},
		{name: "status port that is a proxy port", ann: pod(AnnotationStatusPort, "15021")},
		{name: "status port from mesh default", ann: pod(),
			defaults: func(d *Defaults) { d.StatusPort = 16020 },
			want:     func(t *Traffic) { t.ExcludeInboundPorts = []uint16{16020} }},
		{name: "status port without wildcard: ignored silently",
			ann: pod(AnnotationStatusPort, "15999", AnnotationIncludeInboundPorts, "8080"),
			want: func(t *Traffic) {
				t.IncludeAllInbound = false
				t.IncludeInboundPorts = []uint16{8080}
			}},
		{name: "status port bad", ann: pod(AnnotationStatusPort, "65536"),
			errors: []string{`status.sidecar.istio.io/port: "65536" is not a port (0-65535)`}},

		// Mesh defaults in error.
		{name: "bad mesh default lists, annotations absent", ann: pod(),
			defaults: func(d *Defaults) {
				d.IncludeOutboundIPRanges = "*,10.0.0.0/8"
				d.ExcludeOutboundIPRanges = "nope"
				d.IncludeOutboundPorts = "x"
				d.ExcludeOutboundPorts = "y"
				d.IncludeInboundPorts = "z"
				d.ExcludeInboundPorts = "0"
			},
			errors: []string{
				`Defaults.IncludeOutboundIPRanges: "*" must stand alone, not in "*,10.0.0.0/8"`,
				`Defaults.ExcludeOutboundIPRanges: "nope" is not an IP range (CIDR or address)`,
				`Defaults.IncludeOutboundPorts: "x" is not a port (1-65535)`,
				`Defaults.ExcludeOutboundPorts: "y" is not a port (1-65535)`,
				`Defaults.IncludeInboundPorts: "z" is not a port (1-65535)`,
				`Defaults.ExcludeInboundPorts: "0" is not a port (1-65535)`,
			}},
		{name: "bad mesh default lists, annotations present", ann: pod(
			AnnotationIncludeOutboundIPRanges, "*",
			AnnotationExcludeOutboundIPRanges, "",
			AnnotationIncludeOutboundPorts, "",
			AnnotationExcludeOutboundPorts, "",
			AnnotationIncludeInboundPorts, "*",
			AnnotationExcludeInboundPorts, "",
		),
			defaults: func(d *Defaults) {
				d.IncludeOutboundIPRanges = "bad"
				d.ExcludeOutboundIPRanges = "bad"
				d.IncludeOutboundPorts = "bad"
				d.ExcludeOutboundPorts = "bad"
				d.IncludeInboundPorts = "bad"
				d.ExcludeInboundPorts = "bad"
			}},
		{name: "zero Defaults", ann: pod(), defaults: func(d *Defaults) { *d = Defaults{} },
			errors: []string{
				`Defaults.InterceptionMode: "" is not REDIRECT, TPROXY or NONE`,
				`Defaults.OutboundPort: 0 is not a port (1-65535)`,
				`Defaults.InboundPort: 0 is not a port (1-65535)`,
			},
			warnings: []string{
				`Defaults.ProxyUID: 0 is root: every root process in the pod bypasses the sidecar`,
				`Defaults.ProxyGID: 0 is root's group: every process in group 0 bypasses the sidecar`,
			}},

		// Unsupported and unknown annotations.
		{name: "unsupported annotations", ann: pod(
			AnnotationKubevirtInterfaces, "net1",
			AnnotationExcludeInterfaces, "eth1",
			AnnotationRerouteVirtualInterfaces, "net1",
		),
			warnings: []string{
				`traffic.sidecar.istio.io/excludeInterfaces is not supported by meshsplice; ignored`,
				`traffic.sidecar.istio.io/kubevirtInterfaces is not supported by meshsplice; ignored`,
				`istio.io/reroute-virtual-interfaces is not supported by meshsplice; ignored`,
			}},
		{name: "unknown traffic annotations", ann: pod(
			"traffic.sidecar.istio.io/includeOutboundIpRanges", "10.0.0.0/8",
			"traffic.sidecar.istio.io/excludeInboundPort", "22",
			"meshsplice.io/something-else", "x",
			"example.com/other", "y",
		),
			warnings: []string{
				`traffic.sidecar.istio.io/excludeInboundPort is not an Istio traffic annotation; ignored`,
				`traffic.sidecar.istio.io/includeOutboundIpRanges is not an Istio traffic annotation; ignored`,
			}},

		// Everything at once.
		{name: "all annotations", ann: pod(
			AnnotationInject, "true",
			AnnotationInterceptionMode, "TPROXY",
			AnnotationIncludeOutboundIPRanges, "10.0.0.0/8,fd00::/8",
			AnnotationExcludeOutboundIPRanges, "10.96.0.10",
			AnnotationIncludeOutboundPorts, "5432",
			AnnotationExcludeOutboundPorts, "3306",
			AnnotationIncludeInboundPorts, "*",
			AnnotationExcludeInboundPorts, "22",
			AnnotationStatusPort, "15020",
			AnnotationCapture, "enabled",
			AnnotationSplice, "enabled",
			AnnotationAppSplice, "true",
			AnnotationProxyUID, "1500",
			AnnotationProxyGID, "1600",
		),
			want: func(t *Traffic) {
				t.AppSplice = true
				t.ProxyUID, t.ProxyGID = 1500, 1600
				t.IncludeAllOutbound = false
				t.IncludeOutboundRanges = pfx("10.0.0.0/8", "fd00::/8")
				t.ExcludeOutboundRanges = pfx("10.96.0.10/32")
				t.IncludeOutboundPorts = []uint16{5432}
				t.ExcludeOutboundPorts = []uint16{3306}
				t.ExcludeInboundPorts = []uint16{22}
			}},
		{name: "errors from every annotation are collected, in a fixed order", ann: pod(
			AnnotationInterceptionMode, "BPF",
			AnnotationCapture, "yes",
			AnnotationSplice, "yes",
			AnnotationAppSplice, "maybe",
			AnnotationProxyUID, "root",
			AnnotationProxyGID, "wheel",
			AnnotationIncludeOutboundIPRanges, "10.0.0.0/40",
			AnnotationExcludeOutboundIPRanges, "*",
			AnnotationIncludeOutboundPorts, "0",
			AnnotationExcludeOutboundPorts, "70000",
			AnnotationIncludeInboundPorts, "80,*",
			AnnotationExcludeInboundPorts, "x",
			AnnotationStatusPort, "y",
			AnnotationExcludeInterfaces, "eth1",
		),
			errors: []string{
				`sidecar.istio.io/interceptionMode: "BPF" is not REDIRECT, TPROXY or NONE`,
				`meshsplice.io/capture: "yes" is not "enabled" or "disabled"`,
				`meshsplice.io/splice: "yes" is not "enabled" or "disabled"`,
				`meshsplice.io/app-splice: "maybe" is not "true" or "false"`,
				`meshsplice.io/proxy-uid: "root" is not a uid (0-4294967294)`,
				`meshsplice.io/proxy-gid: "wheel" is not a gid (0-4294967294)`,
				`traffic.sidecar.istio.io/includeOutboundIPRanges: "10.0.0.0/40" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/excludeOutboundIPRanges: "*" is not an IP range (CIDR or address)`,
				`traffic.sidecar.istio.io/includeOutboundPorts: "0" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/excludeOutboundPorts: "70000" is not a port (1-65535)`,
				`traffic.sidecar.istio.io/includeInboundPorts: "*" must stand alone, not in "80,*"`,
				`traffic.sidecar.istio.io/excludeInboundPorts: "x" is not a port (1-65535)`,
				`status.sidecar.istio.io/port: "y" is not a port (0-65535)`,
			},
			warnings: []string{`traffic.sidecar.istio.io/excludeInterfaces is not supported by meshsplice; ignored`}},
		{name: "annotations are validated on pods that are not captured",
			ann:    bare(AnnotationInject, "false", AnnotationExcludeOutboundPorts, "70000"),
			errors: []string{`traffic.sidecar.istio.io/excludeOutboundPorts: "70000" is not a port (1-65535)`}},
	}

	seen := map[string]bool{}
	for _, tt := range tests {
		if seen[tt.name] {
			t.Fatalf("duplicate test name %q", tt.name)
		}
		seen[tt.name] = true
		t.Run(tt.name, func(t *testing.T) {
			d := DefaultDefaults()
			if tt.defaults != nil {
				tt.defaults(&d)
			}
			got, warnings, err := ParseTraffic(tt.ann, d)

			if !slices.Equal(warnings, tt.warnings) {
				t.Errorf("warnings:\n got %q\nwant %q", warnings, tt.warnings)
			}
			if tt.errors != nil {
				if err == nil {
					t.Fatalf("err = nil, want:\n%s", strings.Join(tt.errors, "\n"))
				}
				if lines := strings.Split(err.Error(), "\n"); !slices.Equal(lines, tt.errors) {
					t.Errorf("err:\n got %q\nwant %q", lines, tt.errors)
				}
				if !reflect.DeepEqual(got, Traffic{}) {
					t.Errorf("Traffic on error = %+v, want the zero value", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			want := base()
			if tt.want != nil {
				tt.want(&want)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Traffic:\n got %+v\nwant %+v", got, want)
			}
			checkInvariants(t, got)
		})
	}
}

// checkInvariants checks what the datapath relies on in every parsed Traffic.
func checkInvariants(t *testing.T, tr Traffic) {
	t.Helper()
	for _, ports := range [][]uint16{tr.IncludeOutboundPorts, tr.ExcludeOutboundPorts, tr.IncludeInboundPorts, tr.ExcludeInboundPorts} {
		if !slices.IsSorted(ports) || len(slices.Compact(slices.Clone(ports))) != len(ports) {
			t.Errorf("ports %v not sorted and unique", ports)
		}
		if slices.Contains(ports, 0) {
			t.Errorf("ports %v contain 0", ports)
		}
	}
	for _, ps := range [][]netip.Prefix{tr.IncludeOutboundRanges, tr.ExcludeOutboundRanges} {
		if !slices.IsSortedFunc(ps, comparePrefix) || len(slices.Compact(slices.Clone(ps))) != len(ps) {
			t.Errorf("prefixes %v not sorted and unique", ps)
		}
		for _, p := range ps {
			if !p.IsValid() || p != p.Masked() || p.Addr().Is4In6() || p.Addr().Zone() != "" {
				t.Errorf("prefix %v is not valid, masked and unmapped", p)
			}
		}
	}
	if tr.IncludeAllOutbound && (len(tr.IncludeOutboundRanges) > 0 || tr.IncludeOutboundLoopback) {
		t.Errorf("IncludeAllOutbound with ranges %v / loopback %v", tr.IncludeOutboundRanges, tr.IncludeOutboundLoopback)
	}
	if tr.IncludeAllInbound && len(tr.IncludeInboundPorts) > 0 {
		t.Errorf("IncludeAllInbound with ports %v", tr.IncludeInboundPorts)
	}
	if !tr.IncludeAllInbound && len(tr.ExcludeInboundPorts) > 0 {
		t.Errorf("ExcludeInboundPorts %v without IncludeAllInbound", tr.ExcludeInboundPorts)
	}
	if tr.Splice && !tr.Capture || tr.AppSplice && !tr.Splice {
		t.Errorf("Capture %v, Splice %v, AppSplice %v", tr.Capture, tr.Splice, tr.AppSplice)
	}
}

func TestParseTrafficNilAnnotations(t *testing.T) {
	got, warnings, err := ParseTraffic(nil, DefaultDefaults())
	if err != nil || len(warnings) != 0 {
		t.Fatalf("ParseTraffic(nil) warnings %q, err %v", warnings, err)
	}
	want := base()
	want.Capture, want.Sidecar, want.Splice = false, false, false
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ParseTraffic(nil) = %+v, want %+v", got, want)
	}
}

// FuzzParseTraffic checks that any value either fails or parses into a
// Traffic that keeps the invariants, and that decisions never panic.
func FuzzParseTraffic(f *testing.F) {
	f.Add("*", "", "", "", "*", "", "1337")
	f.Add("10.0.0.0/8,::ffff:10.0.0.0/104", "10.1.2.3/16", "80,443", "3306", "8080", "22", "2000")
	f.Add("127.0.0.0/8, ::1", "fd00::1/8", " , ", "70000", "*,80", "0", "x")
	f.Fuzz(func(t *testing.T, incR, excR, incP, excP, incIn, excIn, uid string) {
		ann := pod(
			AnnotationIncludeOutboundIPRanges, incR,
			AnnotationExcludeOutboundIPRanges, excR,
			AnnotationIncludeOutboundPorts, incP,
			AnnotationExcludeOutboundPorts, excP,
			AnnotationIncludeInboundPorts, incIn,
			AnnotationExcludeInboundPorts, excIn,
			AnnotationProxyUID, uid,
		)
		tr, _, err := ParseTraffic(ann, DefaultDefaults())
		if err != nil {
			if !reflect.DeepEqual(tr, Traffic{}) {
				t.Fatalf("Traffic on error = %+v", tr)
			}
			return
		}
		checkInvariants(t, tr)
		for _, dst := range []string{"10.1.2.3:80", "[::ffff:10.1.2.3]:443", "[fd00::1]:3306", "127.0.0.2:8080"} {
			tr.CaptureOutbound(netip.MustParseAddrPort(dst), 1000, 1000)
			tr.CaptureInbound(netip.MustParseAddrPort(dst), netip.MustParseAddr("192.0.2.1"))
		}
	})
}

// TestAppSpliceDefaults: Defaults.AppSplice is what a pod without
// meshsplice.io/app-splice gets; the annotation wins either way; splice
// disabled turns it off without a warning unless the pod asked for it.
func TestAppSpliceDefaults(t *testing.T) {
	for _, tc := range []struct {
		def      bool
		ann      map[string]string
		want     bool
		warnings int
	}{
		{false, map[string]string{}, false, 0},
		{true, map[string]string{}, true, 0},
		{true, map[string]string{AnnotationAppSplice: "false"}, false, 0},
		{false, map[string]string{AnnotationAppSplice: "true"}, true, 0},
		{true, map[string]string{AnnotationSplice: "disabled"}, false, 0},
		{false, map[string]string{AnnotationSplice: "disabled", AnnotationAppSplice: "true"}, false, 1},
	} {
		d := DefaultDefaults()
		d.AppSplice = tc.def
		ann := map[string]string{AnnotationStatus: "{}"}
		for k, v := range tc.ann {
			ann[k] = v
		}
		tr, warnings, err := ParseTraffic(ann, d)
		if err != nil || tr.AppSplice != tc.want || len(warnings) != tc.warnings {
			t.Errorf("default %v, %v: AppSplice %v, warnings %q, err %v; want %v and %d warnings", tc.def, tc.ann, tr.AppSplice, warnings, err, tc.want, tc.warnings)
		}
	}
}

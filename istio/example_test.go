package istio_test

import (
	"fmt"
	"net/netip"

	"github.com/meshsplice/meshsplice/istio"
)

func ExampleParseTraffic() {
	t, warnings, err := istio.ParseTraffic(map[string]string{
		"sidecar.istio.io/status":                          `{"containers":["istio-proxy"]}`,
		"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8, 192.168.1.7",
		"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.10/12",
		"traffic.sidecar.istio.io/excludeInboundPorts":     "9090",
		"traffic.sidecar.istio.io/excludeInterfaces":       "eth1",
	}, istio.DefaultDefaults())
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, w := range warnings {
		fmt.Println("warning:", w)
	}
	fmt.Println("capture:", t.Capture, "splice:", t.Splice, "include:", t.IncludeOutboundRanges, "exclude:", t.ExcludeOutboundRanges)

	app := uint32(1000)
	for _, dst := range []string{"10.1.2.3:80", "10.96.0.10:53", "8.8.8.8:443", "[::ffff:192.168.1.7]:80", "127.0.0.1:15000"} {
		ok, why := t.CaptureOutbound(netip.MustParseAddrPort(dst), app, app)
		fmt.Println("out", dst, ok, why)
	}
	ok, why := t.CaptureOutbound(netip.MustParseAddrPort("10.1.2.3:80"), 1337, 1337)
	fmt.Println("out 10.1.2.3:80 from the proxy", ok, why)

	remote := netip.MustParseAddr("10.2.0.9")
	for _, port := range []uint16{8080, 9090, 15021} {
		ok, why := t.CaptureInbound(netip.AddrPortFrom(netip.MustParseAddr("10.1.0.5"), port), remote)
		fmt.Println("in", port, ok, why)
	}
	// Envoy's inbound passthrough: from 127.0.0.6 to the pod's own address,
	// inside the pod, over lo. The caller knows the pod's addresses.
	t.PodIPs = []netip.Addr{netip.MustParseAddr("10.1.0.5")}
	to, why := t.Decide(istio.Conn{Local: true, Src: netip.MustParseAddr("127.0.0.6"),
		Dst: netip.MustParseAddrPort("10.1.0.5:8080"), UID: 1337, GID: 1337})
	fmt.Println("passthrough to 8080 from 127.0.0.6", to, why)

	// Output:
	// warning: traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.10/12" has host bits set; using 10.96.0.0/12
	// warning: traffic.sidecar.istio.io/excludeInterfaces is not supported by meshsplice; ignored
	// capture: true splice: true include: [10.0.0.0/8 192.168.1.7/32] exclude: [10.96.0.0/12]
	// out 10.1.2.3:80 true captured
	// out 10.96.0.10:53 false excluded-range
	// out 8.8.8.8:443 false not-included
	// out [::ffff:192.168.1.7]:80 true captured
	// out 127.0.0.1:15000 false loopback
	// out 10.1.2.3:80 from the proxy false proxy-uid
	// in 8080 true captured
	// in 9090 false excluded-inbound-port
	// in 15021 false proxy-port
	// passthrough to 8080 from 127.0.0.6 none inbound-passthrough-source
}

func ExampleParseTraffic_errors() {
	_, _, err := istio.ParseTraffic(map[string]string{
		"sidecar.istio.io/status":                       `{}`,
		"traffic.sidecar.istio.io/excludeOutboundPorts": "3306, 70000",
		"traffic.sidecar.istio.io/includeInboundPorts":  "*,8080",
		"meshsplice.io/proxy-uid":                       "istio-proxy",
	}, istio.DefaultDefaults())
	fmt.Println(err)
	// Output:
	// meshsplice.io/proxy-uid: "istio-proxy" is not a uid (0-4294967294)
	// traffic.sidecar.istio.io/excludeOutboundPorts: "70000" is not a port (1-65535)
	// traffic.sidecar.istio.io/includeInboundPorts: "*" must stand alone, not in "*,8080"
}

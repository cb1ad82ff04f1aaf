package datapath_test

// The constants the BPF C (bpf/common.h, bpf/policy.h, the programs) and
// the Go code both hold must agree. The C stays the source of the layout
// (bpf2go -type generates the Go types and enums); what C and Go each write
// down by hand is compared here, by reading the C.

import (
	"fmt"
	"go/ast"
	"go/constant"
	"go/parser"
	"go/token"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
	"github.com/meshsplice/meshsplice/redirect"
)

var defineRE = regexp.MustCompile(`(?m)^#define[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]+([^/\n]+?)[ \t]*(?:/\*.*)?$`)

// defines returns the integer value of every object-like #define of the C
// files whose value is an integer expression of literals and earlier
// defines (function-like macros and others are left out).
func defines(t *testing.T, files ...string) map[string]int64 {
	t.Helper()
	vals := map[string]int64{}
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range defineRE.FindAllStringSubmatch(string(src), -1) {
			if v, err := evalC(m[2], vals); err == nil {
				vals[m[1]] = v
			}
		}
	}
	return vals
}

// evalC evaluates a C integer expression (+ - * / << >> | &, parentheses,
// decimal and hex literals, names in vals).
func evalC(expr string, vals map[string]int64) (int64, error) {
	e, err := parser.ParseExpr(expr)
	if err != nil {
		return 0, err
	}
	var eval func(ast.Expr) (constant.Value, error)
	eval = func(e ast.Expr) (constant.Value, error) {
		switch e := e.(type) {
		case *ast.BasicLit:
			if e.Kind != token.INT {
				return nil, fmt.Errorf("not an integer: %s", e.Value)
			}
			return constant.MakeFromLiteral(e.Value, token.INT, 0), nil
		case *ast.Ident:
			v, ok := vals[e.Name]
			if !ok {
				return nil, fmt.Errorf("unknown name %s", e.Name)
			}
			return constant.MakeInt64(v), nil
		case *ast.ParenExpr:
			return eval(e.X)
		case *ast.BinaryExpr:
			x, err := eval(e.X)
			if err != nil {
				return nil, err
			}
			y, err := eval(e.Y)
			if err != nil {
				return nil, err
			}
			if e.Op == token.SHL || e.Op == token.SHR {
				s, _ := constant.Uint64Val(y)
				return constant.Shift(x, e.Op, uint(s)), nil
			}
			if e.Op == token.QUO {
				e.Op = token.QUO_ASSIGN // integer division
			}
			return constant.BinaryOp(x, e.Op, y), nil
		}
		return nil, fmt.Errorf("unsupported expression %T", e)
	}
	v, err := eval(e)
	if err != nil {
		return 0, err
	}
	n, ok := constant.Int64Val(v)
	if !ok {
		return 0, fmt.Errorf("%s does not fit in int64", expr)
	}
	return n, nil
}

// function returns the text of the C function name in file (from its name
// to the closing brace at the start of a line).
func function(t *testing.T, file, name string) string {
	t.Helper()
	src, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	s := string(src)
	i := strings.Index(s, " "+name+"(")
	if i < 0 {
		t.Fatalf("%s: no function %s", file, name)
	}
	j := strings.Index(s[i:], "\n}")
	if j < 0 {
		t.Fatalf("%s: function %s has no end", file, name)
	}
	return s[i : i+j]
}

func TestDefinesParse(t *testing.T) {
	vals := map[string]int64{"A": 4}
	for _, tc := range []struct {
		expr string
		want int64
	}{
		{"4096", 4096}, {"0x7f000006", 0x7f000006}, {"(A * 16)", 64},
		{"1 << 3", 8}, {"64 * 1024", 65536}, {"(A / 3)", 1},
	} {
		if got, err := evalC(tc.expr, vals); err != nil || got != tc.want {
			t.Errorf("evalC(%q) = %d, %v; want %d", tc.expr, got, err, tc.want)
		}
	}
	if _, err := evalC("LOAD_U32(ptr)", vals); err == nil {
		t.Errorf("evalC accepted a macro call")
	}
}

// TestCDefinesMatchGo compares every #define with a Go twin.
func TestCDefinesMatchGo(t *testing.T) {
	d := defines(t, "../bpf/common.h", "../bpf/policy.h", "../bpf/capture.c", "../bpf/splice.c", "../bpf/teardown.c")
	var rangeKey redirect.CaptureMsRangeKey
	var polPrefixKey redirect.CaptureMsPolPrefixKey
	for _, tc := range []struct {
		name string
		go_  int64
		twin string
	}{
		{"AF_INET", unix.AF_INET, "unix.AF_INET"},
		{"AF_INET6", unix.AF_INET6, "unix.AF_INET6"},
		{"SOL_IP", unix.SOL_IP, "unix.SOL_IP"},
		{"SOL_IPV6", unix.SOL_IPV6, "unix.SOL_IPV6"},
		{"SO_ORIGINAL_DST", unix.SO_ORIGINAL_DST, "unix.SO_ORIGINAL_DST"},
		{"IP6T_SO_ORIGINAL_DST", unix.SO_ORIGINAL_DST, "unix.SO_ORIGINAL_DST, the same number in ip6_tables.h"},
		{"SOCK_STREAM", unix.SOCK_STREAM, "unix.SOCK_STREAM"},
		{"IPPROTO_TCP", unix.IPPROTO_TCP, "unix.IPPROTO_TCP"},
		{"TCP_LISTEN_STATE", unix.BPF_TCP_LISTEN, "unix.BPF_TCP_LISTEN"},
		{"TCP_ESTABLISHED_STATE", unix.BPF_TCP_ESTABLISHED, "unix.BPF_TCP_ESTABLISHED"},
		// prefixlen of ms_range_key counts bits from kind on: kind and
		// netns are the fixed part, before the address.
		{"MS_RANGE_FIXED_BITS", int64(8 * (unsafe.Offsetof(rangeKey.Ip) - unsafe.Offsetof(rangeKey.Kind))), "ms_range_key layout (redirect.CaptureMsRangeKey)"},
		// prefixlen of ms_pol_prefix_key counts bits from set on: set and
		// family are the fixed part.
		{"MS_POL_PREFIX_FIXED_BITS", int64(8 * (unsafe.Offsetof(polPrefixKey.Ip) - unsafe.Offsetof(polPrefixKey.Set))), "ms_pol_prefix_key layout (redirect.CaptureMsPolPrefixKey)"},
		// The agent gives each pod two listener slots (IPv4, IPv6).
		{"MS_MAX_LISTENERS", 2 * d["MS_MAX_PODS"], "2 * MS_MAX_PODS (datapath/registry.go)"},
	} {
		c, ok := d[tc.name]
		if !ok {
			t.Errorf("#define %s not found in bpf/*.h, bpf/*.c", tc.name)
			continue
		}
		if c != tc.go_ {
			t.Errorf("#define %s is %d in C, %d in Go (%s)", tc.name, c, tc.go_, tc.twin)
		}
	}
}

// TestMapSizes checks the generated objects' map sizes against the
// #defines (the Go side reads sizes from the objects).
func TestMapSizes(t *testing.T) {
	d := defines(t, "../bpf/common.h", "../bpf/policy.h")
	spec, err := redirect.LoadCapture()
	if err != nil {
		t.Fatal(err)
	}
	for m, def := range map[string]string{
		"ms_pods": "MS_MAX_PODS", "ms_pod_ips": "MS_MAX_POD_IPS", "ms_ports": "MS_MAX_PORT_RULES",
		"ms_ranges": "MS_MAX_RANGE_RULES", "ms_socks": "MS_MAX_SOCKS", "ms_orig_dst": "MS_MAX_ORIG_DST",
		"ms_listeners": "MS_MAX_LISTENERS", "ms_ip_info": "MS_MAX_POL_IPS", "ms_pol_sets": "MS_MAX_POL_SETS",
		"ms_pol_ids": "MS_MAX_POL_IDS", "ms_denial_log": "MS_DENIAL_LOG",
	} {
		ms, ok := spec.Maps[m]
		if !ok {
			t.Errorf("map %s not in the capture object", m)
			continue
		}
		if int64(ms.MaxEntries) != d[def] {
			t.Errorf("map %s has %d entries in the object, %s is %d: run make generate", m, ms.MaxEntries, def, d[def])
		}
	}
}

// TestProxyPortsMatchGo: is_proxy_port in common.h lists istio.ProxyPorts,
// and Istio's default capture ports are among them.
func TestProxyPortsMatchGo(t *testing.T) {
	body := function(t, "../bpf/common.h", "is_proxy_port")
	var c []uint16
	for _, m := range regexp.MustCompile(`case (\d+):`).FindAllStringSubmatch(body, -1) {
		p, err := strconv.ParseUint(m[1], 10, 16)
		if err != nil {
			t.Fatal(err)
		}
		c = append(c, uint16(p))
	}
	slices.Sort(c)
	g := slices.Sorted(slices.Values(istio.ProxyPorts))
	if !slices.Equal(c, g) {
		t.Errorf("is_proxy_port (bpf/common.h) lists %v, istio.ProxyPorts %v", c, g)
	}
	def := istio.DefaultDefaults()
	for _, p := range []uint16{def.OutboundPort, def.InboundPort} {
		if !slices.Contains(c, p) {
			t.Errorf("Istio's default capture port %d is not in is_proxy_port", p)
		}
	}
}

// TestPassthroughSourceMatchesGo: addr_is_passthrough in common.h knows
// Envoy's passthrough sources as istio's Decide does.
func TestPassthroughSourceMatchesGo(t *testing.T) {
	body := function(t, "../bpf/common.h", "addr_is_passthrough")
	var lits []uint32
	for _, m := range regexp.MustCompile(`bpf_htonl\((0x[0-9a-fA-F]+|\d+)\)`).FindAllStringSubmatch(body, -1) {
		v, err := strconv.ParseUint(m[1], 0, 32)
		if err != nil {
			t.Fatal(err)
		}
		lits = append(lits, uint32(v))
	}
	if len(lits) != 2 {
		t.Fatalf("addr_is_passthrough: want an IPv4 and an IPv6 literal, found %v", lits)
	}
	v4 := netip.AddrFrom4([4]byte{byte(lits[0] >> 24), byte(lits[0] >> 16), byte(lits[0] >> 8), byte(lits[0])})
	v6 := netip.AddrFrom16([16]byte{12: byte(lits[1] >> 24), 13: byte(lits[1] >> 16), 14: byte(lits[1] >> 8), 15: byte(lits[1])})
	tr, _, err := istio.ParseTraffic(map[string]string{istio.AnnotationStatus: "{}"}, istio.DefaultDefaults())
	if err != nil {
		t.Fatal(err)
	}
	// The sidecar's passthrough: from the source, over lo, to its own pod.
	pod4, pod6 := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::3")
	tr.PodIPs, tr.DualStack = []netip.Addr{pod4, pod6}, true
	for _, tc := range []struct {
		src         netip.Addr
		passthrough bool
	}{
		{v4, true}, {v6, true},
		{v4.Next(), false}, {v6.Next(), false},
	} {
		dst := netip.AddrPortFrom(pod4, 8080)
		if tc.src.Is6() {
			dst = netip.AddrPortFrom(pod6, 8080)
		}
		_, reason := tr.Decide(istio.Conn{Local: true, Src: tc.src, Dst: dst, UID: tr.ProxyUID, GID: tr.ProxyGID})
		if got := reason == istio.ReasonInboundPassthroughSource; got != tc.passthrough {
			t.Errorf("source %s: C says passthrough=%v, istio.Decide says %s", tc.src, tc.passthrough, reason)
		}
	}
}

// TestPolicyMaskWidth: a policy set has policy.MaxAtoms atoms, one bit each
// of ms_pol_set's masks.
func TestPolicyMaskWidth(t *testing.T) {
	var s redirect.CaptureMsPolSet
	for name, bits := range map[string]uintptr{
		"allow_mask": 8 * unsafe.Sizeof(s.AllowMask), "deny_mask": 8 * unsafe.Sizeof(s.DenyMask),
		"default_id_mask": 8 * unsafe.Sizeof(s.DefaultIdMask), "default_port_mask": 8 * unsafe.Sizeof(s.DefaultPortMask),
		"plaintext_mask": 8 * unsafe.Sizeof(s.PlaintextMask),
	} {
		if int(bits) != policy.MaxAtoms {
			t.Errorf("ms_pol_set.%s has %d bits, policy.MaxAtoms is %d", name, bits, policy.MaxAtoms)
		}
	}
}

package istio

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// annotationNames are the annotations ParseTraffic reads: a fuzzed pair
// uses one of them as key (by index) so that the fuzzer spends its time on
// values that are parsed.
var annotationNames = []string{
	AnnotationStatus, AnnotationInject, AnnotationInterceptionMode,
	AnnotationCapture, AnnotationSplice, AnnotationAppSplice,
	AnnotationIncludeOutboundIPRanges, AnnotationExcludeOutboundIPRanges,
	AnnotationIncludeOutboundPorts, AnnotationExcludeOutboundPorts,
	AnnotationIncludeInboundPorts, AnnotationExcludeInboundPorts,
	AnnotationProxyUID,
}

// fuzzAnnotations turns fuzz input into annotations: lines of "key=value"
// where key is an annotation name, or a number indexing annotationNames.
func fuzzAnnotations(b []byte) map[string]string {
	ann := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, "=")
		var i int
		if _, err := fmt.Sscanf(k, "%d", &i); err == nil && i >= 0 {
			k = annotationNames[i%len(annotationNames)]
		}
		ann[k] = v
	}
	return ann
}

// FuzzAnnotations: any set of pod annotations either parses into a Traffic
// that keeps the invariants or fails with the zero Traffic and an error
// that names an annotation it was given (never half a result), and never
// panics. Seeds: testdata/fuzz/FuzzAnnotations.
func FuzzAnnotations(f *testing.F) {
	f.Add([]byte("0={}\n10=80,443,65536\n7=10.0.0.0/33"))
	f.Add([]byte("0={}\n6=10.0.0.0/8,::/0,\u00e9\u0301.0.0.1/8\n12=1337"))
	f.Add([]byte("0={}\n2=TPROXY\n4=disabled\n11=*\n8=-1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ann := fuzzAnnotations(b)
		tr, _, err := ParseTraffic(ann, DefaultDefaults())
		if err != nil {
			if !reflect.DeepEqual(tr, Traffic{}) {
				t.Fatalf("error %v with a Traffic: %+v", err, tr)
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				named := strings.HasPrefix(line, "(") && strings.HasSuffix(line, "more errors not shown)")
				for k := range ann {
					named = named || (k != "" && strings.HasPrefix(line, k+":"))
				}
				if !named {
					t.Fatalf("error line %q names none of the annotations %q", line, keys(ann))
				}
			}
			return
		}
		checkInvariants(t, tr)
	})
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestAnnotationsWithManyEntries: 10,000 ports or ranges in one annotation
// are parsed (or refused with the annotation's name) in bounded work; one
// bad entry among them is named by its value.
func TestAnnotationsWithManyEntries(t *testing.T) {
	many := func(n int, f func(i int) string) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = f(i)
		}
		return strings.Join(parts, ",")
	}
	ports := many(10000, func(i int) string { return fmt.Sprint(1 + i*6) })
	ranges := many(10000, func(i int) string { return fmt.Sprintf("10.%d.%d.0/24", i/256, i%256) })
	for _, tc := range []struct {
		name, key, value, wantErr string
	}{
		{"ports", AnnotationExcludeInboundPorts, ports, ""},
		{"ranges", AnnotationExcludeOutboundIPRanges, ranges, ""},
		{"ports, one out of range", AnnotationExcludeInboundPorts, ports + ",65536", `"65536"`},
		{"ranges, one bad", AnnotationExcludeOutboundIPRanges, ranges + ",10.0.0.0/33", `"10.0.0.0/33"`},
		{"unicode digits", AnnotationIncludeInboundPorts, "\u0668\u0660", AnnotationIncludeInboundPorts},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			tr, _, err := ParseTraffic(pod(tc.key, tc.value), DefaultDefaults())
			t.Logf("%d bytes parsed in %v", len(tc.value), time.Since(start))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				checkInvariants(t, tr)
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.key) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error naming %s and %s", err, tc.key, tc.wantErr)
			}
		})
	}
}

// FuzzLoad: any config folder file either loads or fails with an error
// that names the file, and Load never panics. Seeds:
// testdata/fuzz/FuzzLoad.
func FuzzLoad(f *testing.F) {
	f.Add([]byte("trustDomain: one\n"))
	f.Add([]byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio}\ndata:\n  mesh: |\n    trustDomain: [x\n"))
	f.Add([]byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {capture: maybe}\n"))
	f.Add([]byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: b}\nspec:\n  rules:\n  - from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]\n---\n\u00e9: \u00e9\n"))
	f.Add([]byte("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: n}\nspec: {address: 300.1.1.1}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := Load(map[string][]byte{"/cfg/f.yaml": b})
		if err != nil && !strings.Contains(err.Error(), "/cfg/f.yaml") {
			t.Fatalf("error does not name the file: %v", err)
		}
	})
}

// TestManyBadEntriesAreSummed: 10,000 bad entries or unknown annotations
// give a bounded report (they reach logs, API answers and pod status),
// which still names the annotation and says how many were left out.
func TestManyBadEntriesAreSummed(t *testing.T) {
	ann := pod()
	for i := range 10000 {
		ann[fmt.Sprintf("traffic.sidecar.istio.io/unknown%d", i)] = "1"
	}
	_, warnings, err := ParseTraffic(ann, DefaultDefaults())
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) > maxReported+1 || !strings.Contains(warnings[len(warnings)-1], "more") {
		t.Errorf("%d warnings for 10,000 unknown annotations, want at most %d and a count of the rest", len(warnings), maxReported+1)
	}
	bad := strings.Repeat("x,", 10000)
	_, _, err = ParseTraffic(pod(AnnotationIncludeInboundPorts, bad), DefaultDefaults())
	lines := strings.Split(fmt.Sprint(err), "\n")
	if err == nil || len(lines) > maxReported+1 || !strings.HasPrefix(lines[0], AnnotationIncludeInboundPorts) || !strings.Contains(lines[len(lines)-1], "more") {
		t.Errorf("%d error lines for 10,000 bad ports (first %q), want at most %d naming the annotation and a count of the rest", len(lines), lines[0], maxReported+1)
	}
}

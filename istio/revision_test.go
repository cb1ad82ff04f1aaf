package istio_test

import (
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/istio"
)

// TestForRevision: a node that follows a revision leaves the pods another
// revision injected alone (nothing captured, spliced or enforced), as
// ClassifyPod says; the pods of its own revision, pods without injection
// and every pod of a node that follows no revision (standalone) keep what
// ParseTraffic resolved.
func TestForRevision(t *testing.T) {
	status := func(rev string) string {
		return `{"initContainers":["istio-validation"],"containers":["istio-proxy"],"revision":"` + rev + `"}`
	}
	for _, tc := range []struct {
		name        string
		ann, labels map[string]string
		follows     string
		wantRev     string
		leftAlone   bool
	}{
		{"same revision", map[string]string{istio.AnnotationStatus: status("canary")}, nil, "canary", "canary", false},
		{"other revision", map[string]string{istio.AnnotationStatus: status("default")}, nil, "canary", "default", true},
		{"default pod, default node", map[string]string{istio.AnnotationStatus: status("default")}, nil, istio.DefaultRevision, "default", false},
		{"canary pod, default node", map[string]string{istio.AnnotationStatus: status("canary")}, nil, istio.DefaultRevision, "canary", true},
		{"revision from the label", map[string]string{istio.AnnotationStatus: `{"containers":["istio-proxy"]}`},
			map[string]string{istio.LabelRevision: "canary"}, istio.DefaultRevision, "canary", true},
		{"no revision anywhere: default", map[string]string{istio.AnnotationStatus: `{"containers":["istio-proxy"]}`}, nil, istio.DefaultRevision, "default", false},
		{"standalone follows every revision", map[string]string{istio.AnnotationStatus: status("canary")}, nil, "", "canary", false},
		{"not injected", map[string]string{}, map[string]string{istio.LabelRevision: "canary"}, istio.DefaultRevision, "canary", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := istio.PodRevision(tc.ann, tc.labels); got != tc.wantRev {
				t.Errorf("PodRevision = %q, want %q", got, tc.wantRev)
			}
			tr, _, err := istio.ParseTraffic(tc.ann, istio.DefaultDefaults())
			if err != nil {
				t.Fatal(err)
			}
			got, why := istio.ForRevision(tr, tc.ann, tc.labels, tc.follows)
			if tc.leftAlone {
				if got.Capture || got.Sidecar || got.IPTables || got.Splice || got.AppSplice || !strings.Contains(why, "injected by revision") {
					t.Errorf("ForRevision = %+v, %q; want the pod left alone, with the reason", got, why)
				}
				return
			}
			if why != "" || got.Capture != tr.Capture || got.Sidecar != tr.Sidecar || got.Splice != tr.Splice {
				t.Errorf("ForRevision = %+v, %q; want ParseTraffic's %+v", got, why, tr)
			}
		})
	}
}

package istio_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/istio"
)

// TestKubeSourceLookupPod: LookupPod answers from this node's cache, and
// with a GET for a pod the cache does not hold (here: one of another
// node, which the node's field selector never lets in); a pod the API
// server lacks is not found; the GET is bounded by its context.
func TestKubeSourceLookupPod(t *testing.T) {
	e := newKubeEnv(t)
	src := &istio.KubeSource{Config: e.srv.Config, NodeName: e.node, IstioNamespace: e.istioNS, Batch: 20 * time.Millisecond}
	if _, _, err := src.LookupPod(ctxT(t), e.ns, "here"); !errors.Is(err, istio.ErrNotStarted) {
		t.Fatalf("LookupPod before Run: %v, want ErrNotStarted", err)
	}
	e.createPod(t, podSpec{name: "here", node: e.node, sa: "here-sa", sidecar: "sidecar", ip: nextIP(),
		labels: map[string]string{"app": "here"}, annotations: map[string]string{istio.AnnotationStatus: injectedStatus("default")}})
	e.createPod(t, podSpec{name: "elsewhere", node: "other-" + e.node, sa: "default", ip: nextIP()})

	ctx, cancel := context.WithCancel(context.Background())
	updates := make(chan istio.Config)
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, updates) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("KubeSource.Run: %v", err)
		}
	})
	select {
	case <-updates: // the caches are synced
	case <-time.After(30 * time.Second):
		t.Fatal("no Config within 30 s")
	}
	go func() {
		for {
			select {
			case <-updates:
			case <-ctx.Done():
				return
			}
		}
	}()

	for _, c := range []struct {
		name      string
		found     bool
		sa        string
		meshed    bool
		labelsApp string
	}{
		{"here", true, "here-sa", true, "here"},
		{"elsewhere", true, "default", false, ""}, // not in the cache: a GET
		{"nobody", false, "", false, ""},
	} {
		p, found, err := src.LookupPod(ctxT(t), e.ns, c.name)
		if err != nil {
			t.Errorf("LookupPod %s: %v", c.name, err)
			continue
		}
		if found != c.found || p.ServiceAccount != c.sa || p.Mesh.Meshed != c.meshed || p.Labels["app"] != c.labelsApp {
			t.Errorf("LookupPod %s = %+v, found %v; want found %v, service account %q, meshed %v, app label %q",
				c.name, p, found, c.found, c.sa, c.meshed, c.labelsApp)
		}
	}
	done2, stop := context.WithCancel(context.Background())
	stop()
	if _, _, err := src.LookupPod(done2, e.ns, "nobody"); err == nil {
		t.Error("LookupPod with an ended context went on")
	}
}

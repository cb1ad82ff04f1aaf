package apitest_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/agent/api/apitest"
)

func pod(id string) api.PodRegistration {
	return api.PodRegistration{
		ContainerID: id,
		Netns:       "/run/netns/" + id,
		IfName:      "eth0",
		IPs:         []netip.Addr{netip.MustParseAddr("10.22.0.5")},
	}
}

func TestMemRegistryDecides(t *testing.T) {
	const status = "sidecar.istio.io/status"
	tests := []struct {
		name          string
		ann           map[string]string
		capture, spl  bool
		warn, invalid bool
	}{
		{"no sidecar", nil, false, false, false, false},
		{"sidecar", map[string]string{status: "{}"}, true, true, false, false},
		{"opted out", map[string]string{status: "{}", "meshsplice.io/capture": "disabled"}, false, false, false, false},
		{"no splice", map[string]string{status: "{}", "meshsplice.io/splice": "disabled"}, true, false, false, false},
		{"unsupported", map[string]string{status: "{}", "traffic.sidecar.istio.io/kubevirtInterfaces": "x"}, true, true, true, false},
		{"invalid", map[string]string{status: "{}", "traffic.sidecar.istio.io/includeInboundPorts": "x"}, false, false, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var reg apitest.MemRegistry
			p := pod("c1")
			p.Annotations = tt.ann
			st, err := reg.AddPod(context.Background(), p)
			if tt.invalid {
				if !errors.Is(err, api.ErrInvalidRequest) || !strings.Contains(err.Error(), "includeInboundPorts") {
					t.Fatalf("AddPod: %v, want ErrInvalidRequest naming the annotation", err)
				}
				if _, ok := reg.Pod("c1"); ok {
					t.Error("an invalid pod was registered")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Capture != tt.capture || st.Splice != tt.spl || (len(st.Warnings) > 0) != tt.warn {
				t.Errorf("capture=%v splice=%v warnings=%q, want %v %v warnings=%v", st.Capture, st.Splice, st.Warnings, tt.capture, tt.spl, tt.warn)
			}
		})
	}
}

func TestMemRegistryConcurrent(t *testing.T) {
	var reg apitest.MemRegistry
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			id := fmt.Sprintf("c%d", i)
			for range 50 {
				if _, err := reg.AddPod(ctx, pod(id)); err != nil {
					t.Error(err)
					return
				}
				_, _ = reg.CheckPod(ctx, id)
				_ = reg.Pods()
				_ = reg.RemovePod(ctx, id)
			}
		})
	}
	wg.Wait()
	if n := len(reg.Pods()); n != 0 {
		t.Errorf("%d pods left", n)
	}
}

func TestMemRegistryRemoveAndReady(t *testing.T) {
	var reg apitest.MemRegistry
	ctx := context.Background()
	if err := reg.RemovePod(ctx, "unknown"); err != nil {
		t.Errorf("RemovePod of an unknown pod: %v", err)
	}
	if _, err := reg.CheckPod(ctx, "unknown"); !errors.Is(err, api.ErrPodNotFound) {
		t.Errorf("CheckPod of an unknown pod: %v, want ErrPodNotFound", err)
	}
	reg.SetReady(false)
	if err := reg.Health(ctx); !errors.Is(err, api.ErrNotReady) {
		t.Errorf("Health when not ready: %v", err)
	}
	if _, err := reg.AddPod(ctx, pod("c1")); !errors.Is(err, api.ErrNotReady) {
		t.Errorf("AddPod when not ready: %v", err)
	}
	reg.SetReady(true)
	if _, err := reg.AddPod(ctx, pod("c1")); err != nil {
		t.Errorf("AddPod when ready again: %v", err)
	}
	// Returned values are copies.
	st, _ := reg.Pod("c1")
	st.Pod.IPs[0] = netip.MustParseAddr("10.0.0.1")
	if again, _ := reg.Pod("c1"); again.Pod.IPs[0] != netip.MustParseAddr("10.22.0.5") {
		t.Error("changing a returned registration changed the registry")
	}
}

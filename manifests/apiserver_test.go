package manifests

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/meshsplice/meshsplice/internal/kubetest"
)

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }

// TestServerDryRun: Kubernetes itself checks every object the chart
// renders (default and non-default values, and the plain YAML): each is
// created with dryRun=All and strict field validation (what kubectl apply
// --dry-run=server does) on the tests' real kube-apiserver, which checks it
// against its schema and admission and stores nothing.
// The PodMonitor is left out: its CRD (Prometheus Operator) is not there.
func TestServerDryRun(t *testing.T) {
	s := kubetest.Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, ns := range []string{"istio-system", "meshsplice"} { // the renders' namespaces
		_, err := s.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	h := helm(t)
	for _, tc := range []struct {
		name string
		yaml []byte
	}{
		{"plain YAML", must(os.ReadFile("meshsplice.yaml"))},
		{"custom values", run(t, h, "template", "ms", chart, "-n", "meshsplice", "--kube-version", "1.30.0", "-f", "testdata/values-custom.yaml")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, err := range dryRun(ctx, s.Config, tc.yaml) {
				t.Error(err)
			}
		})
	}
	// A wrong object is refused: the check can fail.
	bad := `{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"x","namespace":"meshsplice"},"spec":{"selector":{"matchLabels":{"a":"b"}},"template":{"metadata":{"labels":{"a":"c"}},"spec":{"containers":[{"name":"c","image":"i"}]}}}}`
	if errs := dryRun(ctx, s.Config, []byte(bad)); len(errs) == 0 {
		t.Errorf("a DaemonSet whose selector does not match its pods passed")
	}
}

// dryRun creates every object of a multi-document YAML with dryRun=All
// and returns what the API server refused.
func dryRun(ctx context.Context, cfg *rest.Config, docs []byte) []error {
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return []error{err}
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return []error{err}
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disc))
	var errs []error
	for _, doc := range strings.Split(string(docs), "\n---\n") {
		obj := &unstructured.Unstructured{}
		if err := yaml.Unmarshal([]byte(doc), &obj.Object); err != nil {
			errs = append(errs, err)
			continue
		}
		if len(obj.Object) == 0 {
			continue // only comments
		}
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", gvk, err))
			continue
		}
		var ri dynamic.ResourceInterface = dc.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dc.Resource(m.Resource).Namespace(obj.GetNamespace())
		}
		if _, err := ri.Create(ctx, obj, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll},
			FieldValidation: metav1.FieldValidationStrict}); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", gvk.Kind, obj.GetName(), err))
		}
	}
	return errs
}

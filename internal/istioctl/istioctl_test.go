package istioctl

import (
	"os"
	"strings"
	"testing"
)

// A manifest as istioctl manifest generate writes it: documents split by
// "---" lines, a comment-only document, and a block scalar holding YAML of
// its own (the injection templates), whose indented "---" is not a split.
const manifest = `# a comment only
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: istio
data:
  mesh: |-
    defaultConfig:
      discoveryAddress: istiod.istio-system.svc:15012
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: istio-sidecar-injector
data:
  values: '{"global":{}}'
  config: |-
    templates:
      sidecar: |
        a: 1
        ---
        b: 2
---
apiVersion: v1
kind: Service
metadata:
  name: istiod
`

func TestDocs(t *testing.T) {
	docs := Docs([]byte(manifest))
	if len(docs) != 3 {
		t.Fatalf("%d documents, want 3: %q", len(docs), docs)
	}
	if !strings.Contains(string(docs[1]), "        ---\n        b: 2") {
		t.Errorf("the indented --- split a document: %q", docs[1])
	}
}

func TestConfigOf(t *testing.T) {
	dir := t.TempDir()
	c, err := ConfigOf([]byte(manifest), dir)
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		c.Mesh:   "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012",
		c.Values: `{"global":{}}`,
		c.Config: "templates:\n  sidecar: |\n    a: 1\n    ---\n    b: 2",
	} {
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Errorf("%s = %q, want %q", path, got, want)
		}
	}
	if c.Revision != "" {
		t.Errorf("revision %q, want the default one", c.Revision)
	}
	// The ConfigMaps of revision canary (IstioOperator spec.revision).
	canary := strings.NewReplacer("name: istio\n", "name: istio-canary\n  labels: {istio.io/rev: canary}\n",
		"name: istio-sidecar-injector\n", "name: istio-sidecar-injector-canary\n  labels: {istio.io/rev: canary}\n").Replace(manifest)
	c, err = ConfigOf([]byte(canary), t.TempDir())
	if err != nil || c.Revision != "canary" {
		t.Errorf("canary manifest: %+v, %v; want revision canary", c, err)
	}
	// Without the injector's ConfigMap there is nothing to inject with.
	if _, err := ConfigOf([]byte(strings.Replace(manifest, "istio-sidecar-injector", "other", 1)), t.TempDir()); err == nil {
		t.Error("no error for a manifest without istio-sidecar-injector")
	}
}

func TestPodOf(t *testing.T) {
	pod, err := PodOf([]byte(`apiVersion: apps/v1
kind: Deployment
metadata: {name: d, namespace: ns}
spec:
  selector: {matchLabels: {app: a}}
  template:
    metadata:
      labels: {app: a}
      annotations: {sidecar.istio.io/status: "{}"}
    spec:
      initContainers: [{name: istio-proxy, image: p, restartPolicy: Always}]
      containers: [{name: app, image: a}]
`))
	if err != nil {
		t.Fatal(err)
	}
	if pod.Kind != "Pod" || pod.Namespace != "ns" || pod.Labels["app"] != "a" || pod.Annotations["sidecar.istio.io/status"] != "{}" ||
		len(pod.Spec.InitContainers) != 1 || pod.Spec.Containers[0].Name != "app" {
		t.Errorf("pod %+v", pod)
	}
	if _, err := PodOf([]byte("kind: Service\n")); err == nil {
		t.Error("no error for a Service")
	}
}

package istio

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const meshConfigMap = `apiVersion: v1
kind: ConfigMap
metadata:
  name: istio
  namespace: istio-system
data:
  mesh: |-
    trustDomain: example.org
    proxyListenPort: 16001
    defaultConfig:
      statusPort: 15020
`

const policy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: shop
spec:
  selector:
    matchLabels:
      app: backend
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
`

func TestLoad(t *testing.T) {
	for _, tc := range []struct {
		name    string
		files   map[string]string
		check   func(t *testing.T, c Config)
		wantErr string
	}{
		{
			name:  "defaults",
			files: map[string]string{},
			check: func(t *testing.T, c Config) {
				d := c.Defaults()
				if d.OutboundPort != 15001 || d.InboundPort != 15006 || c.TrustDomain() != "cluster.local" {
					t.Fatalf("defaults: %+v %s", d, c.TrustDomain())
				}
				if !c.Node.Capture || !c.Node.Splice {
					t.Fatalf("node switches default on: %v", c.Node)
				}
			},
		},
		{
			name:  "istio configmap and policy in one file",
			files: map[string]string{"a.yaml": meshConfigMap + "---\n" + policy},
			check: func(t *testing.T, c Config) {
				if c.TrustDomain() != "example.org" || c.Defaults().OutboundPort != 16001 || c.Defaults().InboundPort != 15006 {
					t.Fatalf("mesh: %v", c.Mesh)
				}
				if len(c.AuthorizationPolicies) != 1 || c.AuthorizationPolicies[0].Name != "allow-frontend" ||
					len(c.AuthorizationPolicies[0].Spec.GetRules()) != 1 {
					t.Fatalf("policies: %v", c.AuthorizationPolicies)
				}
			},
		},
		{
			name:  "bare mesh config and meshsplice switches",
			files: map[string]string{"mesh.yaml": "trustDomain: td.example\n", "ms.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {splice: disabled}\n"},
			check: func(t *testing.T, c Config) {
				if c.TrustDomain() != "td.example" || c.Node.Splice || !c.Node.Capture || c.Node.AppSpliceOff {
					t.Fatalf("got %s %v", c.TrustDomain(), c.Node)
				}
			},
		},
		{
			name:  "app-splice switch",
			files: map[string]string{"ms.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {app-splice: disabled}\n"},
			check: func(t *testing.T, c Config) {
				if !c.Node.Splice || !c.Node.Capture || !c.Node.AppSpliceOff {
					t.Fatalf("got %v", c.Node)
				}
			},
		},
		{
			name: "workload entry and service",
			files: map[string]string{"w.yaml": `apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1, namespace: shop}
spec:
  address: 10.9.0.7
  serviceAccount: legacy
  labels: {app: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
`},
			check: func(t *testing.T, c Config) {
				if len(c.WorkloadEntries) != 1 || c.WorkloadEntries[0].Spec.GetServiceAccount() != "legacy" ||
					c.WorkloadEntries[0].Spec.GetAddress() != "10.9.0.7" {
					t.Fatalf("workload entries: %v", c.WorkloadEntries)
				}
				if len(c.Services) != 1 || c.Services[0].Selector["app"] != "db" || c.Services[0].Namespace != "shop" {
					t.Fatalf("services: %v", c.Services)
				}
				if c.RootNamespace() != "istio-system" {
					t.Fatal(c.RootNamespace())
				}
			},
		},
		{name: "workload entry without address", files: map[string]string{"w.yaml": "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1}\nspec: {address: vm.example.com}\n"}, wantErr: "is not an IP address"},
		{name: "bad yaml", files: map[string]string{"x.yaml": "a: [b"}, wantErr: "x.yaml (document 1): not valid YAML"},
		{name: "two mesh configs", files: map[string]string{"a.yaml": "trustDomain: a\n", "b.yaml": "trustDomain: b\n"}, wantErr: "a second mesh config"},
		{name: "unknown mesh field", files: map[string]string{"a.yaml": "trustDomian: a\n"}, wantErr: "MeshConfig"},
		{name: "bad switch", files: map[string]string{"a.yaml": "kind: ConfigMap\napiVersion: v1\nmetadata: {name: meshsplice}\ndata: {splice: \"off\"}\n"}, wantErr: `data.splice: "off" is not enabled or disabled`},
		{name: "istio configmap without mesh", files: map[string]string{"a.yaml": "kind: ConfigMap\napiVersion: v1\nmetadata: {name: istio}\ndata: {}\n"}, wantErr: `no "mesh" key`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := map[string][]byte{}
			for n, c := range tc.files {
				files[n] = []byte(c)
			}
			c, err := Load(files)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

// TestFileSourceFollowsEdits: an edit is delivered; a broken edit is not,
// and the last good config stays; fixing it is delivered again.
func TestFileSourceFollowsEdits(t *testing.T) {
	dir := t.TempDir()
	// Each edit replaces the file whole (as a ConfigMap volume or an
	// editor's save does): with the test's 10 ms interval, a truncate
	// followed by a write that a loaded machine delays would be a valid
	// (empty) config of its own.
	write := func(s string) {
		tmp := filepath.Join(dir, ".mesh.yaml.tmp")
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "mesh.yaml")); err != nil {
			t.Fatal(err)
		}
	}
	write("trustDomain: one\n")
	src := NewFileSource(dir, nil)
	src.Interval = 10 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := make(chan Config)
	go src.Run(ctx, ch)
	next := func() Config {
		select {
		case c := <-ch:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no config delivered")
		}
		return Config{}
	}
	if td := next().TrustDomain(); td != "one" {
		t.Fatalf("first: %s", td)
	}
	write("trustDomain: [broken\n")
	select {
	case c := <-ch:
		t.Fatalf("a broken edit was delivered: %v", c.Mesh)
	case <-time.After(100 * time.Millisecond):
	}
	write("trustDomain: two\n")
	if td := next().TrustDomain(); td != "two" {
		t.Fatalf("after fix: %s", td)
	}
}

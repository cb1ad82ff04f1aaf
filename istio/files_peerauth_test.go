package istio

import (
	"strings"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// TestLoadPeerAuthentication: the folder source reads PeerAuthentications
// (v1 and v1beta1) with their mode, selector, portLevelMtls and creation
// time, in the default namespace when none is given, and rejects a bad
// mode with its file and document.
func TestLoadPeerAuthentication(t *testing.T) {
	cfg, err := Load(map[string][]byte{"pa.yaml": []byte(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop, creationTimestamp: "2026-01-02T03:04:05Z"}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    9090: {}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default}
spec: {}
`)})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.PeerAuthentications) != 2 {
		t.Fatalf("%d PeerAuthentications, want 2", len(cfg.PeerAuthentications))
	}
	def, web := cfg.PeerAuthentications[0], cfg.PeerAuthentications[1]
	if def.Namespace != "default" || def.Name != "default" || def.Spec.GetMtls() != nil {
		t.Errorf("first: %s/%s %v, want default/default without mtls", def.Namespace, def.Name, def.Spec.String())
	}
	pl := web.Spec.GetPortLevelMtls()
	if web.Namespace != "shop" || web.Spec.GetMtls().GetMode() != securityv1beta1.PeerAuthentication_MutualTLS_STRICT ||
		web.Spec.GetSelector().GetMatchLabels()["app"] != "web" || len(pl) != 2 ||
		pl[8080].GetMode() != securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE ||
		pl[9090].GetMode() != securityv1beta1.PeerAuthentication_MutualTLS_UNSET ||
		web.CreationTimestamp.Year() != 2026 {
		t.Errorf("second: %s/%s created %v %v", web.Namespace, web.Name, web.CreationTimestamp, web.Spec.String())
	}

	_, err = Load(map[string][]byte{"bad.yaml": []byte(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web}
spec: {mtls: {mode: SOMETIMES}}
`)})
	if err == nil || !strings.Contains(err.Error(), "bad.yaml (document 1): PeerAuthentication /web") {
		t.Errorf("bad mode: %v, want an error naming the file and the policy", err)
	}
}

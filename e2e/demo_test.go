package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestDemo runs `meshsplice demo` (what `make demo` runs) with a short
// comparison: it must exit 0, show capture and splice, and leave nothing.
func TestDemo(t *testing.T) {
	testnet.RequireRoot(t)
	// Not t.TempDir: its parent is 0700 and the sidecar (uid 1337) must
	// be able to run the binaries.
	dir, err := os.MkdirTemp("", "mstest-demo-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	build := func(args ...string) {
		cmd := exec.Command("go", append([]string{"build"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %v: %v\n%s", args, err, out)
		}
	}
	build("-o", dir+"/", "github.com/meshsplice/meshsplice/cmd/meshsplice", "github.com/meshsplice/meshsplice/cmd/meshsplice-cni")
	build("-o", filepath.Join(dir, "mstest"), "github.com/meshsplice/meshsplice/e2e/mstest")
	build("-C", "../cni/testdata/refplugins", "-o", filepath.Join(dir, "cni")+"/",
		"github.com/containernetworking/plugins/plugins/main/bridge",
		"github.com/containernetworking/plugins/plugins/ipam/host-local")
	os.Chmod(dir, 0o755)
	out, err := exec.Command(filepath.Join(dir, "meshsplice"), "demo", "--bin-dir", dir, "--requests", "200", "--rounds", "1").CombinedOutput()
	t.Logf("%s", out)
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	for _, want := range []string{"captured by connect4/6: 1, by sk_lookup (inbound): 1; iptables rules in the pods: 0",
		"sockets spliced: 2", "Istio iptables", "refused at connect(): [dial: dial tcp", "nothing left"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	for _, p := range []string{"/sys/fs/bpf/meshsplice-demo", "/run/netns/meshsplice-demo-node"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left behind", p)
		}
	}
}

package kubenode

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// RepoRoot is the meshsplice checkout (go env GOMOD's directory).
func RepoRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out))), nil
}

// Tool is the path of a program hack/deps.sh builds and caches (building
// it first if missing).
func Tool(root, name string) (string, error) {
	out, err := exec.Command(filepath.Join(root, "hack", "deps.sh"), "--path", name).Output()
	if err != nil {
		return "", fmt.Errorf("hack/deps.sh --path %s: %w", name, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// NodeBinaries are the cached programs of a node with its controllers.
func NodeBinaries(root string) (Binaries, error) {
	var b Binaries
	for _, t := range []struct {
		name string
		p    *string
	}{{"kube-apiserver", &b.APIServer}, {"kubelet", &b.Kubelet}, {"kube-controller-manager", &b.ControllerManager}, {"kube-scheduler", &b.Scheduler}} {
		p, err := Tool(root, t.name)
		if err != nil {
			return b, err
		}
		*t.p = p
	}
	return b, nil
}

// BuildTestImage writes, in dir, the OCI archive of TestImage: /mstest
// (the test sidecar, echo servers and client of e2e/mstest) and /pause,
// its entrypoint (the node's pod sandbox).
func BuildTestImage(root, dir string) (string, error) {
	for _, p := range []struct{ pkg, out string }{{"./e2e/mstest", "mstest"}, {"./internal/kubenode/pause", "pause"}} {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, p.out), p.pkg)
		cmd.Dir, cmd.Env = root, append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build %s: %v: %s", p.pkg, err, out)
		}
	}
	img := filepath.Join(dir, "mstest-image.tar")
	cmd := exec.Command("go", "run", "./hack/image", "-o", img, "-ref", TestImage, "-entrypoint", "/pause",
		filepath.Join(dir, "mstest"), filepath.Join(dir, "pause"))
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("hack/image: %v: %s", err, out)
	}
	return img, nil
}

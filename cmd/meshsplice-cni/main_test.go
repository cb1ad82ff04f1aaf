package main_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/internal/testnet"
)

// run runs the plugin binary with env and stdin, as a runtime does.
func run(t *testing.T, bin string, env []string, stdin string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// TestLeanDependencies keeps the plugin, which runs once per pod, free of
// the agent's heavy dependencies (Kubernetes and Istio client libraries,
// protobuf): their package initialisation would slow every pod start.
func TestLeanDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	banned := []string{
		"github.com/meshsplice/meshsplice/istio",
		"github.com/meshsplice/meshsplice/datapath",
		"github.com/cilium/ebpf",
		"k8s.io/",
		"istio.io/",
		"google.golang.org/protobuf",
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, b := range banned {
			if strings.HasPrefix(pkg, b) {
				t.Errorf("meshsplice-cni depends on %s", pkg)
			}
		}
	}
}

func TestBinary(t *testing.T) {
	bin := testnet.BuildBinary(t, ".")

	t.Run("VERSION", func(t *testing.T) {
		out, _, err := run(t, bin, []string{"CNI_COMMAND=VERSION"}, "")
		if err != nil {
			t.Fatalf("VERSION: %v", err)
		}
		var v struct {
			SupportedVersions []string `json:"supportedVersions"`
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("VERSION output %q: %v", out, err)
		}
		want := []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
		if !slices.Equal(v.SupportedVersions, want) {
			t.Errorf("supported versions %v, want %v", v.SupportedVersions, want)
		}
	})

	t.Run("no command", func(t *testing.T) {
		out, errOut, err := run(t, bin, []string{"CNI_COMMAND="}, "")
		if err != nil {
			t.Fatalf("without CNI_COMMAND: %v", err)
		}
		if out != "" {
			t.Errorf("stdout %q, want nothing", out)
		}
		if !strings.Contains(errOut, "meshsplice-cni") || !strings.Contains(errOut, "1.1.0") {
			t.Errorf("stderr %q does not describe the plugin", errOut)
		}
	})

	t.Run("error on stdout", func(t *testing.T) {
		// A bad config fails with the CNI error JSON on stdout, nothing
		// else.
		env := []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=c1", "CNI_NETNS=/proc/self/ns/net", "CNI_IFNAME=eth0", "CNI_PATH=/opt/cni/bin"}
		out, _, err := run(t, bin, env, `{"cniVersion":"1.0.0","name":"n","type":"meshsplice-cni","timeout":"soon"}`)
		if err == nil {
			t.Fatal("ADD with a bad timeout succeeded")
		}
		var e struct {
			Code uint   `json:"code"`
			Msg  string `json:"msg"`
		}
		if err := json.Unmarshal([]byte(out), &e); err != nil {
			t.Fatalf("stdout %q is not a CNI error: %v", out, err)
		}
		if e.Code != 7 || !strings.Contains(e.Msg, `timeout: "soon" is not a duration`) {
			t.Errorf("error %+v, want code 7 naming timeout", e)
		}
	})
}

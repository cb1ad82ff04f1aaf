package cni_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/agent/api/apitest"
	"github.com/meshsplice/meshsplice/cni"
	"github.com/meshsplice/meshsplice/internal/repo"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// readmeBlock returns the code block of README.md in language lang that
// holds every one of want.
func readmeBlock(t *testing.T, lang string, want ...string) string {
	t.Helper()
	md, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
next:
	for _, b := range repo.CodeBlocks(string(md)) {
		if b.Lang != lang {
			continue
		}
		for _, w := range want {
			if !strings.Contains(b.Text, w) {
				continue next
			}
		}
		return b.Text
	}
	t.Fatalf("README.md has no %s block with %q", lang, want)
	return ""
}

// cnitool returns the cnitool hack/deps.sh pins, built into .cache/bin.
func cnitool(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("../hack/deps.sh", "--path", "cnitool").Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("hack/deps.sh --path cnitool: %v\n%s", err, stderr)
	}
	return strings.TrimSpace(string(out))
}

// TestREADMECnitool runs README.md's standalone example as written: its
// network config (bridge + host-local, then meshsplice-cni) in a
// NETCONFPATH, its cnitool command, then its curl commands against the
// agent API, with this test's paths for the plugins, the config, the pod's
// namespace and the agent's socket. cnitool and the plugins run inside a
// node namespace, so the bridge is made there.
func TestREADMECnitool(t *testing.T) {
	testnet.RequireRoot(t)
	confText := readmeBlock(t, "json", `"meshsplice-cni"`, `"plugins"`)
	addText := readmeBlock(t, "sh", "cnitool add")
	curlText := readmeBlock(t, "sh", "curl --unix-socket")
	tool := cnitool(t)
	plugins := pluginDir(t)
	dir := tempDir(t)
	reg := &apitest.MemRegistry{}
	socket := startAgent(t, reg)
	node := testnet.NewNetNS(t, "node")
	pod := testnet.NewNetNS(t, "web")

	// The README's config, with this test's paths: host-local keeps its
	// leases under dir rather than /var/lib/cni.
	var conf struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal([]byte(confText), &conf); err != nil {
		t.Fatalf("README.md's network config: %v", err)
	}
	for _, p := range conf.Plugins {
		if ipam, ok := p["ipam"].(map[string]any); ok {
			ipam["dataDir"] = filepath.Join(dir, "ipam")
		}
		if p["type"] == "meshsplice-cni" {
			p["agentSocket"] = socket
			p["logFile"] = filepath.Join(dir, "cni.log")
		}
	}
	b, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	netDir := filepath.Join(dir, "net.d")
	if err := os.MkdirAll(netDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(netDir, "10-"+conf.Name+".conflist"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	toolDir := filepath.Join(dir, "tools")
	if err := os.MkdirAll(toolDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(tool, filepath.Join(toolDir, "cnitool")); err != nil {
		t.Fatal(err)
	}
	paths := strings.NewReplacer("/opt/cni/bin", plugins, "/etc/cni/net.d", netDir,
		"/run/netns/web-0", pod.Path(), "/run/meshsplice/cni.sock", socket)
	run := func(script string) (string, error) {
		cmd := exec.Command("nsenter", "--net="+node.Path(), "--", "bash", "-euo", "pipefail", "-c", script)
		cmd.Env = append(os.Environ(), "PATH="+toolDir+":"+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	// cnitool caches results in libcni's default /var/lib/cni: remove
	// what this test made there, if it was not there before.
	if _, err := os.Stat("/var/lib/cni"); os.IsNotExist(err) {
		t.Cleanup(func() {
			os.Remove("/var/lib/cni/results")
			os.Remove("/var/lib/cni")
		})
	}
	add := paths.Replace(addText)
	out, err := run(add)
	t.Cleanup(func() {
		if out, err := run(strings.Replace(add, "cnitool add ", "cnitool del ", 1)); err != nil {
			t.Errorf("cnitool del: %v\n%s", err, out)
		}
	})
	if err != nil {
		t.Fatalf("README.md's cnitool command failed: %v\n%s\n%s", err, add, out)
	}
	pods := reg.Pods()
	if len(pods) != 1 {
		t.Fatalf("the agent holds %d pods after cnitool add, want 1", len(pods))
	}
	p := pods[0].Pod
	if p.PodName != "web-0" || p.PodNamespace != "shop" || p.ServiceAccount != "web" || p.Netns != pod.Path() ||
		p.Annotations["sidecar.istio.io/status"] != `{"containers":["istio-proxy"]}` || len(p.IPs) == 0 {
		t.Errorf("the agent got %+v", p)
	}

	// The agent API's curl examples, for the pod cnitool added.
	out, err = run(strings.ReplaceAll(paths.Replace(curlText), "CONTAINER_ID", p.ContainerID))
	if err != nil {
		t.Fatalf("README.md's curl commands failed: %v\n%s", err, out)
	}
	for _, want := range []string{`{"status":"ok"}`, `{"pod":{"containerID":"` + p.ContainerID + `"`} {
		if !strings.Contains(out, want) {
			t.Errorf("curl output lacks %s:\n%s", want, out)
		}
	}
	if n := len(reg.Pods()); n != 0 {
		t.Errorf("the agent holds %d pods after the README's DELETE", n)
	}
}

// TestREADMEConfigs: the meshsplice-cni network configs both READMEs show
// are valid for the plugin (ParseConfig) and name only fields it knows,
// and the capabilities they declare are the plugin's.
func TestREADMEConfigs(t *testing.T) {
	known := map[string]bool{"type": true, "name": true, "cniVersion": true, "capabilities": true}
	typ := reflect.TypeFor[cni.NetConf]()
	for i := range typ.NumField() {
		if name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ","); name != "" {
			known[name] = true
		}
	}
	caps := map[string]bool{cni.PodAnnotationsCapability: true, cni.PodLabelsCapability: true}
	n := 0
	for _, file := range []string{"README.md", "../README.md"} {
		md, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range repo.CodeBlocks(string(md)) {
			if b.Lang != "json" || !strings.Contains(b.Text, `"meshsplice-cni"`) {
				continue
			}
			var doc struct {
				Plugins []map[string]any `json:"plugins"`
			}
			if err := json.Unmarshal([]byte(b.Text), &doc); err != nil {
				t.Errorf("%s:%d: %v", file, b.Line, err)
				continue
			}
			var conf map[string]any
			if err := json.Unmarshal([]byte(b.Text), &conf); err != nil {
				t.Fatal(err)
			}
			for _, p := range doc.Plugins {
				if p["type"] == "meshsplice-cni" {
					conf = p
				}
			}
			n++
			for k := range conf {
				if !known[k] {
					t.Errorf("%s:%d: meshsplice-cni has no config field %q", file, b.Line, k)
				}
			}
			if c, ok := conf["capabilities"].(map[string]any); ok {
				for k := range c {
					if !caps[k] {
						t.Errorf("%s:%d: meshsplice-cni has no capability %q", file, b.Line, k)
					}
				}
			}
			conf["cniVersion"], conf["name"] = "1.1.0", "readme"
			raw, _ := json.Marshal(conf)
			if _, err := cni.ParseConfig(raw); err != nil {
				t.Errorf("%s:%d: %v", file, b.Line, err)
			}
		}
	}
	if n < 2 {
		t.Errorf("found %d meshsplice-cni configs in the READMEs, want 2 or more", n)
	}
}

package manifests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

const chart = "chart/meshsplice"

// helm returns the helm built by hack/deps.sh (cached in .cache/bin).
func helm(tb testing.TB) string {
	tb.Helper()
	out, err := exec.Command("../hack/deps.sh", "--path", "helm").Output()
	if err != nil {
		tb.Fatalf("hack/deps.sh --path helm: %v", err)
	}
	return strings.TrimSpace(string(out))
}

func run(tb testing.TB, name string, args ...string) []byte {
	tb.Helper()
	cmd := exec.Command(name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s%s", filepath.Base(name), strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out
}

func TestHelmLint(t *testing.T) {
	h := helm(t)
	run(t, h, "lint", "--strict", chart)
	run(t, h, "lint", "--strict", chart, "-f", "testdata/values-custom.yaml")
}

// TestPlainYAMLUpToDate: manifests/meshsplice.yaml is the chart rendered
// with its defaults (make manifests).
func TestPlainYAMLUpToDate(t *testing.T) {
	helm(t) // build it first, so the script's output is only the YAML
	want := run(t, "../hack/render-manifests.sh")
	got, err := os.ReadFile("meshsplice.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("manifests/meshsplice.yaml differs from the chart: run make manifests")
	}
}

// The fields of the rendered objects the tests check (k8s.io/api is not
// a dependency of this module on main; the API server's own check is in the
// Kubernetes tests).
type (
	container struct {
		Name, Image     string
		Args            []string
		SecurityContext *struct {
			Privileged   *bool
			Capabilities struct{ Add, Drop []string }
		}
		ReadinessProbe *struct{ HTTPGet *struct{ Path string } }
		VolumeMounts   []struct{ MountPath string }
		Ports          []struct{ ContainerPort int }
	}
	daemonSet struct {
		Spec struct {
			UpdateStrategy struct {
				RollingUpdate *struct{ MaxUnavailable int }
			}
			Template struct {
				Spec struct {
					HostNetwork, HostPID bool
					PriorityClassName    string
					Containers           []container
				}
			}
		}
	}
	rule      struct{ Resources, Verbs []string }
	configMap struct {
		Metadata struct{ Name string }
		Data     map[string]string
	}
	job struct {
		Spec struct {
			Template struct {
				Spec struct {
					HostNetwork                bool
					InitContainers, Containers []container
				}
			}
		}
	}
	objects struct {
		ds       daemonSet
		jobs     []job
		cm       configMap
		roles    [][]rule
		cluster  []rule
		bindings int
	}
)

func parse(tb testing.TB, b []byte) objects {
	tb.Helper()
	var o objects
	for _, doc := range strings.Split(string(b), "\n---\n") {
		var tm struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			tb.Fatalf("rendered YAML: %v\n%s", err, doc)
		}
		var err error
		switch tm.Kind {
		case "DaemonSet":
			err = yaml.Unmarshal([]byte(doc), &o.ds)
		case "ConfigMap":
			err = yaml.Unmarshal([]byte(doc), &o.cm)
		case "Job":
			var j job
			err = yaml.Unmarshal([]byte(doc), &j)
			o.jobs = append(o.jobs, j)
		case "Role":
			var r struct{ Rules []rule }
			err = yaml.Unmarshal([]byte(doc), &r)
			o.roles = append(o.roles, r.Rules)
		case "ClusterRole":
			var r struct{ Rules []rule }
			err = yaml.Unmarshal([]byte(doc), &r)
			o.cluster = r.Rules
		case "RoleBinding", "ClusterRoleBinding":
			o.bindings++
		case "ServiceAccount", "":
		default:
			tb.Errorf("unexpected kind %s", tm.Kind)
		}
		if err != nil {
			tb.Fatalf("%s: %v", tm.Kind, err)
		}
	}
	return o
}

func containerOf(tb testing.TB, ds daemonSet, name string) container {
	tb.Helper()
	i := slices.IndexFunc(ds.Spec.Template.Spec.Containers, func(c container) bool { return c.Name == name })
	if i < 0 {
		tb.Fatalf("no container %s", name)
	}
	return ds.Spec.Template.Spec.Containers[i]
}

// TestRender checks what the chart promises, on the checked-in default
// render and on one with non-default values.
func TestRender(t *testing.T) {
	h := helm(t)
	for _, tc := range []struct {
		name        string
		yaml        []byte
		roles       int    // one Role per namespace whose ConfigMaps are read
		arg         string // an agent argument the values give
		hostPID     bool
		unreachable string
		mounts      []string
	}{
		{
			name: "default", yaml: must(os.ReadFile("meshsplice.yaml")), roles: 1,
			arg: "--switches-namespace=istio-system", unreachable: "fail",
		},
		{
			name: "custom", roles: 2, hostPID: true, arg: "--revision=1-30", unreachable: "pass",
			yaml: run(t, h, "template", "ms", chart, "-n", "meshsplice", "--kube-version", "1.30.0", "-f", "testdata/values-custom.yaml"),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := parse(t, tc.yaml)
			spec := o.ds.Spec.Template.Spec
			agent := containerOf(t, o.ds, "agent")
			if !spec.HostNetwork || spec.HostPID != tc.hostPID {
				t.Errorf("hostNetwork %v hostPID %v, want true %v", spec.HostNetwork, spec.HostPID, tc.hostPID)
			}
			if spec.PriorityClassName != "system-node-critical" {
				t.Errorf("priorityClassName %q", spec.PriorityClassName)
			}
			if sc := agent.SecurityContext; sc == nil || sc.Privileged == nil || *sc.Privileged ||
				!slices.Contains(sc.Capabilities.Add, "BPF") || !slices.Contains(sc.Capabilities.Drop, "ALL") {
				t.Errorf("agent securityContext %+v: want unprivileged, CAP_BPF, all else dropped", sc)
			}
			if !slices.Contains(agent.Args, tc.arg) || !slices.Contains(agent.Args, "--kubernetes") {
				t.Errorf("agent args %v lack %s", agent.Args, tc.arg)
			}
			if p := agent.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" {
				t.Errorf("readiness probe %+v, want /readyz", p)
			}
			mounts := map[string]bool{}
			for _, m := range agent.VolumeMounts {
				mounts[m.MountPath] = true
			}
			for _, m := range []string{"/sys/fs/bpf", "/host/sys/fs/cgroup", "/run/netns", "/var/run/netns", "/run/meshsplice"} {
				if !mounts[m] {
					t.Errorf("agent lacks the mount %s", m)
				}
			}
			if u := o.ds.Spec.UpdateStrategy.RollingUpdate; u == nil || u.MaxUnavailable != 1 {
				t.Errorf("rolling update %+v, want maxUnavailable 1", u)
			}
			cni := containerOf(t, o.ds, "cni-install")
			if !slices.Contains(cni.Args, "--watch") || !slices.Contains(cni.Args, "--agent-unreachable="+tc.unreachable) {
				t.Errorf("cni-install args %v", cni.Args)
			}
			if o.cm.Metadata.Name != "meshsplice" || o.cm.Data["capture"] != "enabled" || o.cm.Data["splice"] != "enabled" {
				t.Errorf("switches ConfigMap %s %v", o.cm.Metadata.Name, o.cm.Data)
			}
			// RBAC: the informers only list and watch; the agent writes
			// nothing but Events, and reads the pod of an Event by name.
			rules := o.cluster
			for _, r := range o.roles {
				rules = append(rules, r...)
			}
			events := false
			for _, r := range rules {
				switch {
				case slices.Equal(r.Resources, []string{"events"}) && slices.Equal(r.Verbs, []string{"create", "patch"}):
					events = true
				case slices.Equal(r.Resources, []string{"pods"}) && slices.Equal(r.Verbs, []string{"get"}):
				case !slices.Equal(r.Verbs, []string{"list", "watch"}):
					t.Errorf("rule %v grants %v, want only list, watch", r.Resources, r.Verbs)
				}
			}
			if !events {
				t.Error("no rule lets the agent create and patch Events")
			}
			if len(o.roles) != tc.roles || o.bindings != tc.roles+1 {
				t.Errorf("%d Roles and %d bindings, want %d and %d", len(o.roles), o.bindings, tc.roles, tc.roles+1)
			}
		})
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// TestDefaultImageIsMakeImage: the chart's default image is the one make
// image builds (the Makefile's IMAGE).
func TestDefaultImageIsMakeImage(t *testing.T) {
	mk, err := os.ReadFile("../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	var image string
	for _, l := range strings.Split(string(mk), "\n") {
		if v, ok := strings.CutPrefix(l, "IMAGE := "); ok {
			image = strings.TrimSpace(v)
		}
	}
	var values struct {
		Image struct{ Repository, Tag string }
	}
	if err := yaml.Unmarshal(must(os.ReadFile(chart+"/values.yaml")), &values); err != nil {
		t.Fatal(err)
	}
	if got := values.Image.Repository + ":" + values.Image.Tag; image == "" || got != image {
		t.Errorf("chart's default image %s, make image builds %q", got, image)
	}
	o := parse(t, must(os.ReadFile("meshsplice.yaml")))
	for _, c := range o.ds.Spec.Template.Spec.Containers {
		if c.Image != image {
			t.Errorf("container %s runs %s, want %s", c.Name, c.Image, image)
		}
	}
}

// TestAgentFlagsExist: every flag the chart passes is one `meshsplice
// agent -h` and `meshsplice cni-install -h` list.
func TestAgentFlagsExist(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "meshsplice")
	run(t, "go", "build", "-o", bin, "../cmd/meshsplice")
	o := parse(t, must(os.ReadFile("meshsplice.yaml")))
	custom := parse(t, run(t, helm(t), "template", "ms", chart, "-n", "meshsplice", "--kube-version", "1.30.0", "-f", "testdata/values-custom.yaml"))
	if len(o.jobs) != 0 || len(custom.jobs) != 1 {
		t.Errorf("%d Jobs in the plain YAML, %d in helm template: want none (kubectl has no hooks) and the uninstall hook", len(o.jobs), len(custom.jobs))
	}
	// The hook's pod declares the agent's port (hostNetwork: a host port),
	// so it runs only once the agent's pod is gone and its cni-install
	// cannot chain the plugin again after cni-uninstall.
	for _, j := range custom.jobs {
		agent := containerOf(t, custom.ds, "agent")
		for _, c := range j.Spec.Template.Spec.Containers {
			if !j.Spec.Template.Spec.HostNetwork || len(c.Ports) != 1 || len(agent.Ports) != 1 || c.Ports[0].ContainerPort != agent.Ports[0].ContainerPort {
				t.Errorf("uninstall hook %s: hostNetwork %v ports %v, want the agent's %v", c.Name, j.Spec.Template.Spec.HostNetwork, c.Ports, agent.Ports)
			}
		}
	}
	var all [][]container
	for _, ds := range []daemonSet{o.ds, custom.ds} {
		all = append(all, ds.Spec.Template.Spec.Containers)
	}
	for _, j := range custom.jobs {
		all = append(all, j.Spec.Template.Spec.InitContainers, j.Spec.Template.Spec.Containers)
	}
	for _, cs := range all {
		for _, c := range cs {
			sub := c.Name // the container is named after its subcommand
			out, _ := exec.Command(bin, sub, "-h").CombinedOutput()
			for _, a := range c.Args {
				name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
				if !strings.Contains(string(out), "\n  -"+name+" ") && !strings.Contains(string(out), "\n  -"+name+"\n") {
					t.Errorf("container %s: meshsplice %s has no flag --%s", c.Name, sub, name)
				}
			}
		}
	}
}

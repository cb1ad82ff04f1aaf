package istio

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"sigs.k8s.io/yaml"
)

// FileSource reads Istio configuration from a folder of ordinary Istio YAML,
// for meshsplice without Kubernetes. It understands, in any *.yaml, *.yml or
// *.json file, any number of documents ("---"):
//
//   - the istio ConfigMap (kind: ConfigMap, metadata.name: istio), whose
//     data.mesh holds the MeshConfig as YAML, as istiod reads it;
//   - a bare MeshConfig document (no kind; fields such as trustDomain,
//     defaultConfig), as in istiod's --meshConfig file;
//   - the meshsplice ConfigMap (metadata.name: meshsplice) with the node
//     switches (data.capture, data.splice, data.app-splice: "enabled" /
//     "disabled");
//   - security.istio.io/v1 (and v1beta1) AuthorizationPolicy and
//     PeerAuthentication (a file's policies have no creation time unless
//     metadata.creationTimestamp gives one: ties at a level go to the first
//     by "name.namespace", as in istiod);
//   - networking.istio.io WorkloadEntry (workloads that are not pods of
//     this node: address, labels, serviceAccount) and v1 Service (name and
//     spec.selector), which policy selectors and targetRefs need.
//
// Other kinds are ignored with a warning. The folder is polled (Interval):
// edits take effect without a restart, once the folder has held still for
// one interval (a file caught half-written is never applied), and an
// invalid edit is reported and ignored, the last good configuration
// staying in force. When the first read is invalid there is no last good
// configuration: Run returns the error.
type FileSource struct {
	Dir      string
	Interval time.Duration
	Log      *slog.Logger
}

// NewFileSource returns a source for dir, polled every 500ms.
func NewFileSource(dir string, log *slog.Logger) *FileSource {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &FileSource{Dir: dir, Interval: 500 * time.Millisecond, Log: log}
}

// Run implements Source.
func (s *FileSource) Run(ctx context.Context, updates chan<- Config) error {
	st, err := os.Stat(s.Dir)
	if err != nil {
		return fmt.Errorf("istio config folder: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("istio config folder %s is not a directory", s.Dir)
	}
	var last, pending [32]byte
	first := true
	tick := time.NewTicker(s.Interval)
	defer tick.Stop()
	for {
		sum, files, err := s.snapshot()
		if err != nil && first {
			return fmt.Errorf("read istio config folder %s (no last good configuration to keep): %w", s.Dir, err)
		} else if err != nil {
			s.Log.Error("read istio config folder", "dir", s.Dir, "error", err)
		} else if !first && sum != last && sum != pending {
			// Changed since the last look: wait until it holds still for
			// one interval, so a file caught half-written is not applied.
			pending = sum
		} else if first || sum != last {
			cfg, err := Load(files)
			if err != nil && first {
				return fmt.Errorf("istio config in %s is invalid and there is no last good one: %w", s.Dir, err)
			} else if err != nil {
				s.Log.Error("istio config rejected; keeping the last good one", "dir", s.Dir, "error", err)
			} else {
				select {
				case updates <- cfg:
				case <-ctx.Done():
					return nil
				}
			}
			last, first = sum, false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// snapshot reads every config file of the folder, with a digest of all.
func (s *FileSource) snapshot() ([32]byte, map[string][]byte, error) {
	entries, err := os.ReadDir(s.Dir)
	if err != nil {
		return [32]byte{}, nil, err
	}
	files := map[string][]byte{}
	var names []string
	for _, e := range entries {
		ext := strings.ToLower(filepath.Ext(e.Name()))
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") || (ext != ".yaml" && ext != ".yml" && ext != ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.Dir, e.Name()))
		if err != nil {
			return [32]byte{}, nil, err
		}
		path := filepath.Join(s.Dir, e.Name())
		files[path] = b
		names = append(names, path)
	}
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		fmt.Fprintf(h, "%s\x00%d\x00", n, len(files[n]))
		h.Write(files[n])
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, files, nil
}

// Load parses config files (path -> content) into a Config. Every bad
// document is reported, with its file and position, in one error.
func Load(files map[string][]byte) (Config, error) {
	cfg := Config{Mesh: DefaultMeshConfig(), Node: NodeSwitches{Capture: true, Splice: true}}
	var errs []error
	var paths []string
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	meshSeen := ""
	for _, path := range paths {
		for i, doc := range splitYAML(files[path]) {
			where := fmt.Sprintf("%s (document %d)", path, i+1)
			if err := loadDoc(&cfg, doc, where, &meshSeen); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", where, err))
			}
		}
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	sort.Slice(cfg.AuthorizationPolicies, func(i, j int) bool {
		a, b := cfg.AuthorizationPolicies[i], cfg.AuthorizationPolicies[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		return a.Name < b.Name
	})
	sortBy(cfg.PeerAuthentications, func(o *securityPA) string { return o.Namespace + "/" + o.Name })
	return cfg, nil
}

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Data map[string]string `json:"data"`
}

func loadDoc(cfg *Config, doc []byte, where string, meshSeen *string) error {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return fmt.Errorf("not valid YAML: %w", err)
	}
	if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
		return nil // empty document
	}
	var tm typeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return fmt.Errorf("not a Kubernetes object or MeshConfig: %w", err)
	}
	switch {
	case tm.Kind == "" && tm.APIVersion == "":
		return setMesh(cfg, js, where, meshSeen)
	case tm.Kind == "ConfigMap" && tm.Metadata.Name == "istio":
		mesh, ok := tm.Data["mesh"]
		if !ok {
			return errors.New(`ConfigMap istio has no "mesh" key`)
		}
		mjs, err := yaml.YAMLToJSON([]byte(mesh))
		if err != nil {
			return fmt.Errorf("data.mesh is not valid YAML: %w", err)
		}
		return setMesh(cfg, mjs, where, meshSeen)
	case tm.Kind == "ConfigMap" && tm.Metadata.Name == "meshsplice":
		for key, v := range tm.Data {
			var on bool
			switch strings.TrimSpace(v) {
			case "enabled":
				on = true
			case "disabled":
			default:
				return fmt.Errorf("data.%s: %q is not enabled or disabled", key, v)
			}
			switch key {
			case "capture":
				cfg.Node.Capture = on
			case "splice":
				cfg.Node.Splice = on
			case "app-splice":
				cfg.Node.AppSpliceOff = !on
			default:
				return fmt.Errorf("data.%s: unknown meshsplice switch (capture, splice, app-splice)", key)
			}
		}
		cfg.Sources = append(cfg.Sources, "meshsplice ConfigMap: "+where)
		return nil
	case tm.Kind == "AuthorizationPolicy" && strings.HasPrefix(tm.APIVersion, "security.istio.io/"):
		ap := &securityv1.AuthorizationPolicy{}
		if err := json.Unmarshal(js, ap); err != nil {
			return fmt.Errorf("AuthorizationPolicy %s/%s: %w", tm.Metadata.Namespace, tm.Metadata.Name, err)
		}
		if ap.Name == "" {
			return errors.New("AuthorizationPolicy without metadata.name")
		}
		if ap.Namespace == "" {
			ap.Namespace = "default"
		}
		cfg.AuthorizationPolicies = append(cfg.AuthorizationPolicies, ap)
		return nil
	case tm.Kind == "PeerAuthentication" && strings.HasPrefix(tm.APIVersion, "security.istio.io/"):
		pa := &securityv1.PeerAuthentication{}
		if err := json.Unmarshal(js, pa); err != nil {
			return fmt.Errorf("PeerAuthentication %s/%s: %w", tm.Metadata.Namespace, tm.Metadata.Name, err)
		}
		if pa.Name == "" {
			return errors.New("PeerAuthentication without metadata.name")
		}
		if pa.Namespace == "" {
			pa.Namespace = "default"
		}
		cfg.PeerAuthentications = append(cfg.PeerAuthentications, pa)
		return nil
	case tm.Kind == "WorkloadEntry" && strings.HasPrefix(tm.APIVersion, "networking.istio.io/"):
		we := &networkingv1.WorkloadEntry{}
		if err := json.Unmarshal(js, we); err != nil {
			return fmt.Errorf("WorkloadEntry %s/%s: %w", tm.Metadata.Namespace, tm.Metadata.Name, err)
		}
		if we.Namespace == "" {
			we.Namespace = "default"
		}
		if _, err := netip.ParseAddr(we.Spec.GetAddress()); err != nil {
			return fmt.Errorf("WorkloadEntry %s/%s: spec.address %q is not an IP address", we.Namespace, we.Name, we.Spec.GetAddress())
		}
		cfg.WorkloadEntries = append(cfg.WorkloadEntries, we)
		return nil
	case tm.Kind == "Service" && tm.APIVersion == "v1":
		var svc struct {
			Metadata struct{ Name, Namespace string } `json:"metadata"`
			Spec     struct {
				Selector map[string]string `json:"selector"`
			} `json:"spec"`
		}
		if err := json.Unmarshal(js, &svc); err != nil {
			return fmt.Errorf("Service %s: %w", tm.Metadata.Name, err)
		}
		if svc.Metadata.Namespace == "" {
			svc.Metadata.Namespace = "default"
		}
		cfg.Services = append(cfg.Services, Service{Namespace: svc.Metadata.Namespace, Name: svc.Metadata.Name, Selector: svc.Spec.Selector})
		return nil
	default:
		cfg.Sources = append(cfg.Sources, fmt.Sprintf("ignored %s %s: %s", tm.Kind, tm.Metadata.Name, where))
		return nil
	}
}

func setMesh(cfg *Config, js []byte, where string, meshSeen *string) error {
	if *meshSeen != "" {
		return fmt.Errorf("a second mesh config (the first is in %s)", *meshSeen)
	}
	m := DefaultMeshConfig()
	if err := protojson.Unmarshal(js, m); err != nil {
		return fmt.Errorf("MeshConfig: %w", err)
	}
	if m.DefaultConfig == nil {
		m.DefaultConfig = DefaultMeshConfig().DefaultConfig
	}
	cfg.Mesh = proto.Clone(m).(*meshv1alpha1.MeshConfig)
	*meshSeen = where
	cfg.Sources = append(cfg.Sources, "mesh config: "+where)
	return nil
}

// splitYAML splits a multi-document YAML stream at "---" lines.
func splitYAML(b []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	for _, line := range bytes.SplitAfter(b, []byte("\n")) {
		if t := bytes.TrimRight(line, " \t\r\n"); bytes.Equal(t, []byte("---")) || bytes.HasPrefix(t, []byte("--- ")) {
			docs = append(docs, bytes.Clone(cur.Bytes()))
			cur.Reset()
			continue
		}
		cur.Write(line)
	}
	docs = append(docs, cur.Bytes())
	var out [][]byte
	for _, d := range docs {
		if len(bytes.TrimSpace(d)) > 0 {
			out = append(out, d)
		}
	}
	return out
}

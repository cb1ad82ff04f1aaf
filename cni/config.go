package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshsplice/meshsplice/agent/api"
)

// PodAnnotationsCapability is the runtimeConfig key, and the capability to
// declare in the network config, under which the runtime passes the pod's
// annotations. containerd and CRI-O fill it for Kubernetes pods; libcni
// users pass it in RuntimeConf.CapabilityArgs and cnitool users in CAP_ARGS.
const PodAnnotationsCapability = "io.kubernetes.cri.pod-annotations"

// PodLabelsCapability is the runtimeConfig key under which a standalone
// caller passes the pod's labels (AuthorizationPolicy selectors match them).
// Kubernetes runtimes do not pass labels: there the agent reads them from
// the API server.
const PodLabelsCapability = "io.meshsplice.pod-labels"

// UnreachablePolicy says what ADD does when the agent cannot be reached.
type UnreachablePolicy string

const (
	// Fail makes ADD fail, so the runtime retries and the pod does not
	// start until the agent is back. The default.
	Fail UnreachablePolicy = "fail"
	// Pass lets the pod start unmeshed: nothing captures its traffic.
	Pass UnreachablePolicy = "pass"
)

// DefaultTimeout bounds each call to the agent unless the config says
// otherwise.
const DefaultTimeout = 10 * time.Second

// maxSocketPath is the longest path a unix socket address can hold
// (sun_path is 108 bytes with the terminating NUL).
const maxSocketPath = 107

// NetConf is the plugin's entry in a network configuration list, as the
// runtime passes it on stdin.
type NetConf struct {
	types.PluginConf

	// AgentSocket is the agent's API socket; default api.DefaultSocket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// AgentUnreachable is "fail" (default) or "pass".
	AgentUnreachable string `json:"agentUnreachable,omitempty"`
	// Timeout bounds each call to the agent, in Go duration syntax
	// ("10s", "500ms"); default DefaultTimeout.
	Timeout string `json:"timeout,omitempty"`
	// LogFile is where the plugin logs (JSON lines, appended). Without it
	// the plugin logs warnings and errors to stderr.
	LogFile string `json:"logFile,omitempty"`
	// Annotations are defaults for every pod's annotations; the pod's own
	// annotations (runtimeConfig) override them key by key.
	Annotations map[string]string `json:"annotations,omitempty"`
	// RuntimeConfig is what the runtime passes for the capabilities the
	// config declares.
	RuntimeConfig struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
		PodLabels      map[string]string `json:"io.meshsplice.pod-labels,omitempty"`
	} `json:"runtimeConfig"`
}

// Config is a parsed and validated NetConf.
type Config struct {
	// CNIVersion and Network are the config's cniVersion and name.
	CNIVersion, Network string
	// Socket is the agent's API socket.
	Socket string
	// Unreachable is what ADD does when the agent cannot be reached.
	Unreachable UnreachablePolicy
	// Timeout bounds each call to the agent.
	Timeout time.Duration
	// LogFile is the log file, or "" for stderr.
	LogFile string
	// Annotations are the pod's annotations: the config's defaults with
	// the runtime's pod annotations on top.
	Annotations map[string]string
	// Labels are the pod's labels (PodLabelsCapability), if passed.
	Labels map[string]string
	// PrevResult is the previous plugin's result in the config's version,
	// nil when there is none.
	PrevResult types.Result
}

// ParseConfig decodes and validates the network config from stdin. Its
// errors are *types.Error: ErrDecodingFailure for JSON that does not
// decode, ErrInvalidNetworkConfig naming every invalid field.
func ParseConfig(stdin []byte) (*Config, error) {
	var nc NetConf
	if err := json.Unmarshal(stdin, &nc); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Field != "" {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("meshsplice-cni: invalid network config: %s: JSON %s where %s is expected",
					strings.TrimPrefix(typeErr.Field, "PluginConf."), typeErr.Value, jsonType(typeErr.Type)), "")
		}
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("meshsplice-cni: parse network config: %v", err), "")
	}
	c := &Config{
		CNIVersion:  nc.CNIVersion,
		Network:     nc.Name,
		Socket:      nc.AgentSocket,
		Unreachable: UnreachablePolicy(nc.AgentUnreachable),
		Timeout:     DefaultTimeout,
		LogFile:     nc.LogFile,
	}
	var bad []string
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if !filepath.IsAbs(c.Socket) {
		bad = append(bad, fmt.Sprintf("agentSocket: %q must be an absolute path", c.Socket))
	} else if len(c.Socket) > maxSocketPath {
		bad = append(bad, fmt.Sprintf("agentSocket: %q is longer than %d bytes, the limit for a unix socket path", c.Socket, maxSocketPath))
	}
	switch c.Unreachable {
	case "":
		c.Unreachable = Fail
	case Fail, Pass:
	default:
		bad = append(bad, fmt.Sprintf("agentUnreachable: %q is not one of %q, %q", nc.AgentUnreachable, Fail, Pass))
	}
	if nc.Timeout != "" {
		d, err := time.ParseDuration(nc.Timeout)
		switch {
		case err != nil:
			bad = append(bad, fmt.Sprintf("timeout: %q is not a duration (write it like \"10s\" or \"500ms\")", nc.Timeout))
		case d <= 0:
			bad = append(bad, fmt.Sprintf("timeout: %q must be positive", nc.Timeout))
		default:
			c.Timeout = d
		}
	}
	if c.LogFile != "" && !filepath.IsAbs(c.LogFile) {
		bad = append(bad, fmt.Sprintf("logFile: %q must be an absolute path", c.LogFile))
	}
	for _, k := range slices.Sorted(maps.Keys(nc.Annotations)) {
		if strings.TrimSpace(k) == "" {
			bad = append(bad, fmt.Sprintf("annotations: %q is not an annotation name", k))
		}
	}
	if len(bad) > 0 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"meshsplice-cni: invalid network config: "+strings.Join(bad, "; "), "")
	}

	if len(nc.Annotations)+len(nc.RuntimeConfig.PodAnnotations) > 0 {
		c.Annotations = make(map[string]string, len(nc.Annotations)+len(nc.RuntimeConfig.PodAnnotations))
		maps.Copy(c.Annotations, nc.Annotations)
		maps.Copy(c.Annotations, nc.RuntimeConfig.PodAnnotations)
	}

	if err := version.ParsePrevResult(&nc.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("meshsplice-cni: %v", err), "")
	}
	c.Labels = nc.RuntimeConfig.PodLabels
	c.PrevResult = nc.PrevResult
	return c, nil
}

// jsonType names the JSON type that decodes into t.
func jsonType(t reflect.Type) string {
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	}
	return "a number"
}

// currentResult returns the previous result in the current result format.
func (c *Config) currentResult() (*current.Result, error) {
	res, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("meshsplice-cni: convert prevResult: %v", err), "")
	}
	return res, nil
}

package cni

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// FuzzParseConfig: any stdin either parses or fails with a *types.Error of
// a decoding or invalid-config code whose message names the field (or
// says the JSON does not decode); never a panic. Seeds:
// testdata/fuzz/FuzzParseConfig.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice"}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice","agentSocket":"rel/path","timeout":"-1s","agentUnreachable":"maybe","logFile":"x"}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice","annotations":{" ":"x","é":"\u0000"},"runtimeConfig":{"podAnnotations":{"a":"b"}}}`))
	f.Add([]byte(`{"cniVersion":"0.4.0","name":"n","type":"meshsplice","prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.300/24"}]}}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice","timeout":5}`))
	f.Fuzz(func(t *testing.T, stdin []byte) {
		c, err := ParseConfig(stdin)
		if err == nil {
			if c.Socket == "" || c.Timeout <= 0 || (c.Unreachable != Fail && c.Unreachable != Pass) {
				t.Fatalf("accepted config with unset fields: %+v", c)
			}
			return
		}
		var te *types.Error
		if !errors.As(err, &te) {
			t.Fatalf("error %v is not a *types.Error", err)
		}
		if te.Code != types.ErrDecodingFailure && te.Code != types.ErrInvalidNetworkConfig {
			t.Fatalf("error code %d: %v", te.Code, err)
		}
		if !strings.HasPrefix(te.Msg, "meshsplice-cni: ") {
			t.Fatalf("error does not say who: %v", err)
		}
	})
}

// FuzzParseArgs: CNI_ARGS either parse or fail with a *types.Error naming
// the bad pair; a well-formed pair of ours is read back as given. Seeds:
// testdata/fuzz/FuzzParseArgs.
func FuzzParseArgs(f *testing.F) {
	f.Add("K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;IgnoreUnknown=1")
	f.Add("K8S_POD_NAME;;=;K8S_POD_UID==x")
	f.Add("K8S_POD_NAME=\u00e9\u0000;K8S_POD_SERVICE_ACCOUNT=a=b")
	f.Fuzz(func(t *testing.T, s string) {
		a, err := parseArgs(s)
		if err != nil {
			var te *types.Error
			if !errors.As(err, &te) || te.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(te.Msg, "CNI_ARGS") {
				t.Fatalf("error %v is not an invalid-environment *types.Error naming CNI_ARGS", err)
			}
			if a != (podArgs{}) {
				t.Fatalf("error with half a result: %+v", a)
			}
			return
		}
		want := ""
		for _, pair := range strings.Split(s, ";") {
			if k, v, _ := strings.Cut(pair, "="); k == ArgPodName {
				want = v // the last one wins
			}
		}
		if a.name != want {
			t.Fatalf("%s read as %q, want %q", ArgPodName, a.name, want)
		}
	})
}

package api_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/agent/api/apitest"
)

// FuzzRegistration: any POST /v1/pods body is either registered as sent
// (200) or refused with 400 invalid_request and a message that names a
// field or the body; a refused request leaves the registry as it was.
// Seeds: testdata/fuzz/FuzzRegistration.
func FuzzRegistration(f *testing.F) {
	f.Add([]byte(`{"containerID":"c1","netns":"/run/netns/p","ifName":"eth0","ips":["10.0.0.5","fd00::5"]}`))
	f.Add([]byte(`{"containerID":"c1","netns":"rel","ifName":"eth0/x","ips":["10.0.0.300","::%eth0"]}`))
	f.Add([]byte(`{"containerID":"c1","netns":"/n","ifName":"eth0","ips":["0.0.0.0"],"annotations":{"":"x","é":"\u0000"}}`))
	f.Add([]byte(`{"containerID":5}`))
	f.Add([]byte(`[1,2]`))
	f.Add([]byte(`{"containerID":"c1","netns":"/n","ifName":"eth0","ips":["10.0.0.1"],"labels":{"a":1}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		reg := &apitest.MemRegistry{}
		prev := api.PodRegistration{ContainerID: "c1", Netns: "/run/netns/prev", IfName: "eth0", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.9")}}
		if _, err := reg.AddPod(context.Background(), prev); err != nil {
			t.Fatal(err)
		}
		h := api.NewHandler(reg, nil)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/v1/pods", strings.NewReader(string(body))))
		switch rec.Code {
		case http.StatusOK:
			var st api.PodStatus
			if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
				t.Fatalf("200 with a body that does not decode: %v", err)
			}
			if err := st.Pod.Validate(); err != nil {
				t.Fatalf("registered an invalid request: %v", err)
			}
			// Paths and names go to system calls, which stop at NUL.
			if strings.ContainsRune(st.Pod.Netns, 0) || strings.ContainsRune(st.Pod.IfName, 0) {
				t.Fatalf("registered a NUL byte in netns %q or ifName %q", st.Pod.Netns, st.Pod.IfName)
			}
		case http.StatusBadRequest:
			var e api.Error
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Code != api.CodeInvalidRequest || e.Message == "" {
				t.Fatalf("400 with body %s", rec.Body.Bytes())
			}
			got, err := reg.CheckPod(context.Background(), "c1")
			if err != nil || !reflect.DeepEqual(got.Pod, prev) {
				t.Fatalf("a refused request changed the registry: %+v, %v", got.Pod, err)
			}
		default:
			t.Fatalf("HTTP %d %s", rec.Code, rec.Body.Bytes())
		}
	})
}

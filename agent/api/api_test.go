package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/agent/api/apitest"
)

// socketPath returns a socket path in a fresh temporary directory, short
// enough for sun_path (t.TempDir's names grow with the test name).
func socketPath(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "ms-api-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "cni.sock")
}

// serve runs h with httptest on a unix socket and returns the socket path.
func serve(tb testing.TB, h http.Handler) string {
	tb.Helper()
	path := socketPath(tb)
	ln, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(h)
	ts.Listener.Close()
	ts.Listener = ln
	ts.Start()
	tb.Cleanup(ts.Close)
	return path
}

// newClient returns a client for the socket, closed by the cleanup.
func newClient(tb testing.TB, socket string, timeout time.Duration) *api.Client {
	tb.Helper()
	c := api.NewClient(socket, timeout)
	tb.Cleanup(c.Close)
	return c
}

// raw sends a request as curl would and returns the status and body.
func raw(tb testing.TB, socket, method, path, body string) (int, []byte) {
	tb.Helper()
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://meshsplice"+path, strings.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp.StatusCode, b
}

func pod(id string) api.PodRegistration {
	return api.PodRegistration{
		ContainerID:    id,
		Netns:          "/run/netns/" + id,
		IfName:         "eth0",
		IPs:            []netip.Addr{netip.MustParseAddr("10.22.0.5"), netip.MustParseAddr("fd00:22::5")},
		PodName:        "web-0",
		PodNamespace:   "shop",
		PodUID:         "6f1e2c3a",
		ServiceAccount: "web",
		Annotations:    map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`},
		Network:        "meshsplice",
	}
}

func TestRoundTrip(t *testing.T) {
	reg := &apitest.MemRegistry{}
	socket := serve(t, api.NewHandler(reg, nil))
	c := newClient(t, socket, 0)
	ctx := context.Background()

	if err := c.Health(ctx); err != nil {
		t.Fatalf("Health: %v", err)
	}
	want := pod("c1")
	st, err := c.AddPod(ctx, want)
	if err != nil {
		t.Fatalf("AddPod: %v", err)
	}
	if !st.Capture || !st.Splice {
		t.Errorf("AddPod: capture=%v splice=%v, want both for an injected pod", st.Capture, st.Splice)
	}
	assertPod(t, st.Pod, want)
	if got, ok := reg.Pod("c1"); !ok {
		t.Fatal("registry does not have c1")
	} else {
		assertPod(t, got.Pod, want)
	}

	st, err = c.CheckPod(ctx, "c1")
	if err != nil {
		t.Fatalf("CheckPod: %v", err)
	}
	assertPod(t, st.Pod, want)

	// Re-registering replaces.
	want.IPs = want.IPs[:1]
	if _, err := c.AddPod(ctx, want); err != nil {
		t.Fatalf("AddPod again: %v", err)
	}
	if got := reg.Pods(); len(got) != 1 {
		t.Fatalf("registry has %d pods after re-registration, want 1", len(got))
	} else {
		assertPod(t, got[0].Pod, want)
	}

	for i := range 2 {
		if err := c.RemovePod(ctx, "c1"); err != nil {
			t.Fatalf("RemovePod #%d: %v", i+1, err)
		}
	}
	_, err = c.CheckPod(ctx, "c1")
	if !errors.Is(err, api.ErrPodNotFound) {
		t.Fatalf("CheckPod after RemovePod: %v, want ErrPodNotFound", err)
	}
	var apiErr *api.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound || apiErr.Code != api.CodePodNotFound {
		t.Fatalf("CheckPod after RemovePod: %#v, want a 404 pod_not_found", err)
	}
	if !strings.Contains(err.Error(), "c1") {
		t.Errorf("error %q does not name the container", err)
	}
}

func assertPod(tb testing.TB, got, want api.PodRegistration) {
	tb.Helper()
	g, _ := json.Marshal(got)
	w, _ := json.Marshal(want)
	if !bytes.Equal(g, w) {
		tb.Errorf("registration:\n got %s\nwant %s", g, w)
	}
}

func TestJSONShapes(t *testing.T) {
	socket := serve(t, api.NewHandler(&apitest.MemRegistry{}, nil))
	body := `{"containerID":"abc","netns":"/run/netns/x","ifName":"eth0","ips":["10.0.0.2","fd00::2"],
		"podName":"p","podNamespace":"ns","serviceAccount":"sa","annotations":{"a":"b"},"futureField":1}`
	status, b := raw(t, socket, http.MethodPost, "/v1/pods", body)
	if status != http.StatusOK {
		t.Fatalf("POST /v1/pods: %d %s", status, b)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	p, _ := got["pod"].(map[string]any)
	if p["containerID"] != "abc" || p["netns"] != "/run/netns/x" || p["podNamespace"] != "ns" || p["serviceAccount"] != "sa" {
		t.Errorf("answer %s lacks the registration under \"pod\"", b)
	}
	if ips, _ := p["ips"].([]any); len(ips) != 2 || ips[0] != "10.0.0.2" || ips[1] != "fd00::2" {
		t.Errorf("answer %s: ips not as sent", b)
	}
	if _, ok := got["capture"].(bool); !ok {
		t.Errorf("answer %s has no boolean capture", b)
	}

	status, b = raw(t, socket, http.MethodGet, "/v1/health", "")
	if status != http.StatusOK || strings.TrimSpace(string(b)) != `{"status":"ok"}` {
		t.Errorf("GET /v1/health: %d %s", status, b)
	}
	status, b = raw(t, socket, http.MethodDelete, "/v1/pods/abc", "")
	if status != http.StatusNoContent || len(b) != 0 {
		t.Errorf("DELETE /v1/pods/abc: %d %q, want 204 and no body", status, b)
	}
}

func TestBadRequests(t *testing.T) {
	socket := serve(t, api.NewHandler(&apitest.MemRegistry{}, nil))
	good := `"containerID":"abc","netns":"/run/netns/x","ifName":"eth0"`
	tests := []struct {
		name, method, path, body string
		status                   int
		code                     string
		msg                      []string // substrings of the message
	}{
		{"empty body", "POST", "/v1/pods", "", 400, api.CodeInvalidRequest, []string{"empty body"}},
		{"not JSON", "POST", "/v1/pods", "{", 400, api.CodeInvalidRequest, []string{"not valid JSON"}},
		{"not an object", "POST", "/v1/pods", `[1]`, 400, api.CodeInvalidRequest, []string{"JSON object"}},
		{"bad ip", "POST", "/v1/pods", `{` + good + `,"ips":["10.0.0.1","10.0.0.300"]}`, 400, api.CodeInvalidRequest,
			[]string{`ips[1]: "10.0.0.300" is not an IP address`}},
		{"ip not a string", "POST", "/v1/pods", `{` + good + `,"ips":[5]}`, 400, api.CodeInvalidRequest, []string{"ips", "number"}},
		{"name not a string", "POST", "/v1/pods", `{` + good + `,"ips":["10.0.0.1"],"podName":7}`, 400, api.CodeInvalidRequest,
			[]string{"podName: JSON number where a string is expected"}},
		{"annotation not a string", "POST", "/v1/pods", `{` + good + `,"ips":["10.0.0.1"],"annotations":{"a":true}}`, 400, api.CodeInvalidRequest,
			[]string{"annotations", "bool"}},
		{"missing fields", "POST", "/v1/pods", `{}`, 400, api.CodeInvalidRequest,
			[]string{"containerID: is required", "netns: is required", "ifName: is required", "ips: at least one pod IP is required"}},
		{"relative netns", "POST", "/v1/pods", `{"containerID":"abc","netns":"x","ifName":"eth0","ips":["10.0.0.1"]}`, 400, api.CodeInvalidRequest,
			[]string{`netns: "x" must be an absolute path`}},
		{"bad container id", "POST", "/v1/pods", `{"containerID":"-x","netns":"/x","ifName":"eth0","ips":["10.0.0.1"]}`, 400, api.CodeInvalidRequest,
			[]string{`containerID: "-x" must match`}},
		{"unspecified ip", "POST", "/v1/pods", `{` + good + `,"ips":["0.0.0.0"]}`, 400, api.CodeInvalidRequest,
			[]string{"ips[0]: 0.0.0.0 is the unspecified address"}},
		{"long ifname", "POST", "/v1/pods", `{"containerID":"abc","netns":"/x","ifName":"eth0123456789abc","ips":["10.0.0.1"]}`, 400, api.CodeInvalidRequest,
			[]string{"ifName"}},
		{"invalid annotation value", "POST", "/v1/pods", `{` + good + `,"ips":["10.0.0.1"],"annotations":{"traffic.sidecar.istio.io/excludeOutboundPorts":"70000"}}`,
			400, api.CodeInvalidRequest, []string{"excludeOutboundPorts", "70000"}},
		{"bad id in path", "GET", "/v1/pods/-x", "", 400, api.CodeInvalidRequest, []string{"containerID"}},
		{"unknown pod", "GET", "/v1/pods/nope", "", 404, api.CodePodNotFound, []string{"nope", "not registered"}},
		{"no endpoint", "GET", "/v2/pods", "", 404, api.CodeNotFound, []string{"/v2/pods"}},
		{"wrong method", "PUT", "/v1/pods", "{}", 405, api.CodeMethodNotAllowed, []string{"POST"}},
		{"wrong method on pod", "POST", "/v1/pods/abc", "{}", 405, api.CodeMethodNotAllowed, []string{"GET, DELETE"}},
	}
	// For these the message is exactly "invalid request: " and msg joined
	// by "; ".
	exact := map[string]bool{"bad ip": true, "name not a string": true, "missing fields": true, "relative netns": true, "unspecified ip": true}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, b := raw(t, socket, tt.method, tt.path, tt.body)
			if status != tt.status {
				t.Errorf("status %d, want %d (%s)", status, tt.status, b)
			}
			var e api.Error
			if err := json.Unmarshal(b, &e); err != nil {
				t.Fatalf("error body %q is not JSON: %v", b, err)
			}
			if e.Code != tt.code {
				t.Errorf("code %q, want %q (%s)", e.Code, tt.code, b)
			}
			for _, m := range tt.msg {
				if !strings.Contains(e.Message, m) {
					t.Errorf("message %q does not contain %q", e.Message, m)
				}
			}
			if exact[tt.name] && e.Message != "invalid request: "+strings.Join(tt.msg, "; ") {
				t.Errorf("message %q, want %q", e.Message, "invalid request: "+strings.Join(tt.msg, "; "))
			}
		})
	}
}

// failingRegistry fails every call with err.
type failingRegistry struct{ err error }

func (f failingRegistry) AddPod(context.Context, api.PodRegistration) (api.PodStatus, error) {
	return api.PodStatus{}, f.err
}
func (f failingRegistry) CheckPod(context.Context, string) (api.PodStatus, error) {
	return api.PodStatus{}, f.err
}
func (f failingRegistry) RemovePod(context.Context, string) error { return f.err }
func (f failingRegistry) Health(context.Context) error            { return f.err }

func TestErrorMapping(t *testing.T) {
	tests := []struct {
		err      error
		status   int
		code     string
		sentinel error
	}{
		{fmt.Errorf("bad pod: %w", api.ErrInvalidRequest), 400, api.CodeInvalidRequest, api.ErrInvalidRequest},
		{fmt.Errorf("x: %w", api.ErrPodNotFound), 404, api.CodePodNotFound, api.ErrPodNotFound},
		{fmt.Errorf("netns differs: %w", api.ErrConflict), 409, api.CodeConflict, api.ErrConflict},
		{fmt.Errorf("datapath loading: %w", api.ErrNotReady), 503, api.CodeNotReady, api.ErrNotReady},
		{errors.New("map update: no space left"), 500, api.CodeInternal, nil},
	}
	for _, tt := range tests {
		t.Run(tt.code, func(t *testing.T) {
			socket := serve(t, api.NewHandler(failingRegistry{tt.err}, nil))
			c := newClient(t, socket, 0)
			ctx := context.Background()
			calls := map[string]func() error{
				"AddPod":    func() error { _, err := c.AddPod(ctx, pod("c1")); return err },
				"CheckPod":  func() error { _, err := c.CheckPod(ctx, "c1"); return err },
				"RemovePod": func() error { return c.RemovePod(ctx, "c1") },
				"Health":    func() error { return c.Health(ctx) },
			}
			for name, call := range calls {
				err := call()
				var apiErr *api.Error
				if !errors.As(err, &apiErr) {
					t.Fatalf("%s: %v (%T), want *api.Error", name, err, err)
				}
				if apiErr.StatusCode != tt.status || apiErr.Code != tt.code {
					t.Errorf("%s: HTTP %d %s, want %d %s", name, apiErr.StatusCode, apiErr.Code, tt.status, tt.code)
				}
				if !strings.Contains(err.Error(), tt.err.Error()) {
					t.Errorf("%s: message %q lost the registry's error %q", name, err, tt.err)
				}
				if tt.sentinel != nil && !errors.Is(err, tt.sentinel) {
					t.Errorf("%s: errors.Is(%v, %v) = false", name, err, tt.sentinel)
				}
				if errors.Is(err, api.ErrAgentUnreachable) {
					t.Errorf("%s: an answer must not look unreachable", name)
				}
			}
		})
	}
}

func TestUnreachable(t *testing.T) {
	// No socket file at all.
	missing := socketPath(t)
	// A socket file nobody listens on, as a crashed agent leaves it.
	stale := socketPath(t)
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()

	for name, socket := range map[string]string{"missing": missing, "stale": stale} {
		t.Run(name, func(t *testing.T) {
			c := newClient(t, socket, time.Second)
			ctx := context.Background()
			_, errAdd := c.AddPod(ctx, pod("c1"))
			_, errCheck := c.CheckPod(ctx, "c1")
			for _, err := range []error{errAdd, errCheck, c.RemovePod(ctx, "c1"), c.Health(ctx)} {
				if !errors.Is(err, api.ErrAgentUnreachable) {
					t.Errorf("error %v does not wrap ErrAgentUnreachable", err)
				}
				want := "meshsplice agent not reachable at " + socket + ": dial unix " + socket
				if err == nil || !strings.HasPrefix(err.Error(), want) {
					t.Errorf("error %q does not start with %q", err, want)
				}
			}
		})
	}
}

// blockingRegistry never answers before the request is cancelled.
type blockingRegistry struct{ apitest.MemRegistry }

func (b *blockingRegistry) AddPod(ctx context.Context, _ api.PodRegistration) (api.PodStatus, error) {
	<-ctx.Done()
	return api.PodStatus{}, ctx.Err()
}

func TestTimeout(t *testing.T) {
	socket := serve(t, api.NewHandler(&blockingRegistry{}, nil))
	c := newClient(t, socket, 100*time.Millisecond)
	start := time.Now()
	_, err := c.AddPod(context.Background(), pod("c1"))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("AddPod to a stuck agent: %v, want a deadline error saying the agent did not answer", err)
	}
	if errors.Is(err, api.ErrAgentUnreachable) {
		t.Errorf("a stuck agent is reachable: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("AddPod returned after %v; the 100ms timeout was not applied", d)
	}
	// The caller's context counts too.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := newClient(t, socket, time.Minute).Health(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Health with a cancelled context: %v", err)
	}
}

func TestHealthNotReady(t *testing.T) {
	reg := &apitest.MemRegistry{}
	socket := serve(t, api.NewHandler(reg, nil))
	c := newClient(t, socket, 0)
	ctx := context.Background()
	reg.SetReady(false)
	if err := c.Health(ctx); !errors.Is(err, api.ErrNotReady) {
		t.Errorf("Health of a registry that is not ready: %v, want ErrNotReady", err)
	}
	if _, err := c.AddPod(ctx, pod("c1")); !errors.Is(err, api.ErrNotReady) {
		t.Errorf("AddPod to a registry that is not ready: %v, want ErrNotReady", err)
	}
	reg.SetReady(true)
	if err := c.Health(ctx); err != nil {
		t.Errorf("Health after SetReady(true): %v", err)
	}
}

func TestListen(t *testing.T) {
	path := socketPath(t)
	// A stale socket from a crashed agent is replaced.
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()

	srv, err := api.Listen(path, &apitest.MemRegistry{}, nil)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() { srv.Close() })

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	c := newClient(t, path, 0)
	if err := c.Health(context.Background()); err != nil {
		t.Fatalf("Health: %v", err)
	}
	// A live socket is not taken over.
	if _, err := api.Listen(path, &apitest.MemRegistry{}, nil); err == nil || !strings.Contains(err.Error(), "another process is listening") {
		t.Errorf("Listen on a live socket: %v, want an error", err)
	}
	// Not a socket: left alone.
	file := filepath.Join(filepath.Dir(path), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := api.Listen(file, &apitest.MemRegistry{}, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen on a regular file: %v, want an error", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still there after Shutdown: %v", err)
	}
	if err := c.Health(context.Background()); !errors.Is(err, api.ErrAgentUnreachable) {
		t.Errorf("Health after Shutdown: %v, want ErrAgentUnreachable", err)
	}
}

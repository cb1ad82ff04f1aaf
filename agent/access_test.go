package agent

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
)

// TestMetricsPortIsReadOnlyAndLocal: the metrics port answers only GET and
// HEAD, and listens on loopback unless told otherwise.
func TestMetricsPortIsReadOnlyAndLocal(t *testing.T) {
	ap, err := netip.ParseAddrPort(DefaultMetricsAddr)
	if err != nil || !ap.Addr().IsLoopback() {
		t.Errorf("DefaultMetricsAddr %q is not a loopback address", DefaultMetricsAddr)
	}
	h := readOnly(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for _, tc := range []struct {
		method string
		want   int
	}{
		{http.MethodGet, http.StatusOK},
		{http.MethodHead, http.StatusOK},
		{http.MethodPost, http.StatusMethodNotAllowed},
		{http.MethodPut, http.StatusMethodNotAllowed},
		{http.MethodDelete, http.StatusMethodNotAllowed},
		{http.MethodPatch, http.StatusMethodNotAllowed},
	} {
		for _, path := range []string{"/pods", "/denials", "/metrics"} {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tc.method, path, nil))
			if rec.Code != tc.want {
				t.Errorf("%s %s: HTTP %d, want %d", tc.method, path, rec.Code, tc.want)
			}
		}
	}
}

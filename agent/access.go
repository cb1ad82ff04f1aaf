package agent

import (
	"fmt"
	"net/http"
	"os"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
)

// checkPodNetns refuses a registration that names the agent's own network
// namespace (the host's: capturing it would capture the node), or an
// address its namespace does not hold (a registration must not claim
// another pod's or the node's address). cookie is req.Netns's cookie.
func checkPodNetns(req api.PodRegistration, cookie uint64) error {
	pod, err := os.Stat(req.Netns)
	if err != nil {
		return fmt.Errorf("%w: netns: %w", api.ErrInvalidRequest, err)
	}
	// thread-self: an unlocked goroutine's thread is always in the agent's
	// own netns (netnsutil locks the threads it moves); the main thread
	// behind /proc/self may not be.
	host, err := os.Stat("/proc/thread-self/ns/net")
	if err != nil {
		return fmt.Errorf("the agent's own netns: %w", err)
	}
	if os.SameFile(pod, host) {
		return fmt.Errorf("%w: netns: %s is the agent's (the host's) network namespace, not a pod's", api.ErrInvalidRequest, req.Netns)
	}
	for i, ip := range req.IPs {
		held, err := datapath.NetnsHolds(cookie, req.Netns, ip)
		if err != nil {
			return fmt.Errorf("%w: ips[%d]: cannot list the addresses of netns %s: %w", api.ErrInvalidRequest, i, req.Netns, err)
		}
		if !held {
			return fmt.Errorf("%w: ips[%d]: %s is not an address of netns %s", api.ErrInvalidRequest, i, ip, req.Netns)
		}
	}
	return nil
}

// readOnly answers 405 to anything but GET and HEAD: the metrics port
// (/metrics, /pods, /denials, health) only reads. It is bound to loopback
// by default (DefaultMetricsAddr), so only processes in the host's network
// namespace can read it; see README "Who can reach the agent".
func readOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, r.Method+" "+r.URL.Path+": the metrics port is read-only (GET, HEAD)", http.StatusMethodNotAllowed)
			return
		}
		h.ServeHTTP(w, r)
	})
}

package datapath

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/redirect"
	"github.com/meshsplice/meshsplice/sockops"
)

// ProbeResult says whether this kernel loads meshsplice's programs.
type ProbeResult struct {
	Name string `json:"name"`
	OK   bool   `json:"ok"`
	// Required: meshsplice cannot run without it; otherwise the feature
	// is off on this kernel and Detail says what that means.
	Required bool   `json:"required"`
	Detail   string `json:"detail,omitempty"`
}

// Probe loads every program into the kernel, unpinned and unattached, and
// unloads it again: the verifier's verdict on this very kernel, which is
// what a feature list cannot promise.
func Probe() []ProbeResult {
	load := func(name string, required bool, spec func() (*ebpf.CollectionSpec, error), detailOnFail string) ProbeResult {
		r := ProbeResult{Name: name, Required: required}
		cs, err := spec()
		if err == nil {
			for _, m := range cs.Maps {
				m.Pinning = ebpf.PinNone
			}
			var coll *ebpf.Collection
			coll, err = ebpf.NewCollection(cs)
			if err == nil {
				coll.Close()
			}
		}
		if err != nil {
			r.Detail = fmt.Sprintf("%s: %v", detailOnFail, explainLoad(err))
			return r
		}
		r.OK = true
		return r
	}
	return []ProbeResult{
		load("capture (connect4/6, getsockopt, sk_lookup, listener iterator)", true, redirect.LoadCapture,
			"capture cannot load (needs Linux >= 6.1 with BTF, cgroup BPF, sk_lookup, sk_storage)"),
		load("splice (sockops, sk_msg)", true, sockops.LoadSplice,
			"splice cannot load (needs sockmap, sk_msg with bpf_get_netns_cookie and sk_storage: Linux >= 6.1)"),
		load("policy teardown (iter/tcp + bpf_sock_destroy)", false, redirect.LoadTeardown,
			"live connections are not closed on a policy change (needs Linux >= 6.5); new ones are still judged"),
	}
}

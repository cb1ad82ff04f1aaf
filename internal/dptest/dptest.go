// Package dptest holds test helpers for tests that need a meshsplice
// datapath attached to a test cgroup (internal/testnet resources only).
package dptest

import (
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// CgroupHooks are the hooks meshsplice attaches to a cgroup.
var CgroupHooks = []ebpf.AttachType{
	ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
}

// Attached is a datapath attached to a test cgroup with one captured pod.
type Attached struct {
	Cgroup *testnet.Cgroup
	PinDir string
	Pod    *testnet.NetNS // the pod's netns, with an sk_lookup link
	Cookie uint64         // its cookie
	DP     *datapath.Datapath
}

// Attach opens a datapath on a fresh test cgroup and pin directory and
// registers one captured pod, so that both kinds of link exist. The
// datapath is detached at cleanup.
func Attach(tb testing.TB) *Attached {
	tb.Helper()
	testnet.RequireRoot(tb)
	a := &Attached{Cgroup: testnet.NewCgroup(tb)}
	a.PinDir = testnet.PinDir(tb, func(dir string) error { return datapath.Detach(dir, 0) })
	d, err := datapath.Open(datapath.Options{PinDir: a.PinDir, CgroupPath: a.Cgroup.Path, Node: datapath.NodeSettings{Capture: true, Splice: true}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	a.DP = d
	a.Pod = testnet.NewNetNS(tb, "dp")
	tr, _, err := istio.ParseTraffic(map[string]string{istio.AnnotationStatus: "{}"}, istio.DefaultDefaults())
	if err != nil {
		tb.Fatal(err)
	}
	if err := d.AddPod(datapath.Pod{NetnsPath: a.Pod.Path(), Traffic: tr}); err != nil {
		tb.Fatal(err)
	}
	if a.Cookie, err = a.Pod.Cookie(); err != nil {
		tb.Fatal(err)
	}
	return a
}

// Programs asks the kernel which programs run on target (a cgroup
// directory or a netns file) for the given hooks.
func Programs(tb testing.TB, target string, hooks ...ebpf.AttachType) []ebpf.ProgramID {
	tb.Helper()
	f, err := os.Open(target)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	var ids []ebpf.ProgramID
	for _, at := range hooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			tb.Fatalf("query %s on %s: %v", at, target, err)
		}
		for _, p := range res.Programs {
			ids = append(ids, p.ID)
		}
	}
	return ids
}

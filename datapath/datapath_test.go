package datapath_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// cgroupAttachTypes are the hooks meshsplice attaches to a cgroup.
var cgroupAttachTypes = []ebpf.AttachType{
	ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
}

func attachedPrograms(t *testing.T, cgroup string) int {
	t.Helper()
	n := 0
	for _, at := range cgroupAttachTypes {
		res, err := link.QueryPrograms(link.QueryOptions{Target: mustOpenFD(t, cgroup), Attach: at})
		if err != nil {
			t.Fatalf("query %s: %v", at, err)
		}
		n += len(res.Programs)
	}
	return n
}

func mustOpenFD(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func TestOpenUpdateDetach(t *testing.T) {
	testnet.RequireRoot(t)
	cg := testnet.NewCgroup(t)
	pin := testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, 0) })

	d, err := datapath.Open(datapath.Options{PinDir: pin, CgroupPath: cg.Path, Node: datapath.NodeSettings{Capture: true, Splice: true}})
	if err != nil {
		t.Fatal(err)
	}
	if n := attachedPrograms(t, cg.Path); n != 4 {
		t.Fatalf("attached programs after Open: %d, want 4", n)
	}
	d.Close()
	// Gone Go process: still attached (pinned).
	if n := attachedPrograms(t, cg.Path); n != 4 {
		t.Fatalf("attached programs after Close: %d, want 4", n)
	}
	// A second Open updates in place: still one program per hook.
	d, err = datapath.Open(datapath.Options{PinDir: pin, CgroupPath: cg.Path, Node: datapath.NodeSettings{Capture: true, Splice: true}})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if n := attachedPrograms(t, cg.Path); n != 4 {
		t.Fatalf("attached programs after second Open: %d, want 4", n)
	}
	if err := datapath.Detach(pin, 0); err != nil {
		t.Fatal(err)
	}
	if n := attachedPrograms(t, cg.Path); n != 0 {
		t.Fatalf("attached programs after Detach: %d, want 0", n)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		entries, _ := filepath.Glob(pin + "/*/*")
		t.Fatalf("pin dir left behind: %v %v", err, entries)
	}
}

// TestProbe: this kernel (6.18) must load every program, the optional
// teardown iterator included (bpf_sock_destroy is in 6.5).
func TestProbe(t *testing.T) {
	testnet.RequireRoot(t)
	for _, r := range datapath.Probe() {
		if !r.OK {
			t.Errorf("%s: %s", r.Name, r.Detail)
		}
	}
}

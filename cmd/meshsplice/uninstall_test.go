package main

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// attached counts the programs the kernel runs on target for each hook.
func attached(t *testing.T, target string, hooks ...ebpf.AttachType) int {
	t.Helper()
	f, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for _, at := range hooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatalf("query %s on %s: %v", at, target, err)
		}
		n += len(res.Programs)
	}
	return n
}

var cgroupHooks = []ebpf.AttachType{
	ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
}

// attachForTest attaches a datapath to a test cgroup with one captured pod
// (so one sk_lookup link too) and closes the Go handles, as an agent that
// has stopped leaves it.
func attachForTest(t *testing.T) (cg *testnet.Cgroup, pin string, ns *testnet.NetNS) {
	t.Helper()
	testnet.RequireRoot(t)
	cg = testnet.NewCgroup(t)
	pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, 0) })
	d, err := datapath.Open(datapath.Options{PinDir: pin, CgroupPath: cg.Path, Node: datapath.NodeSettings{Capture: true, Splice: true}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ns = testnet.NewNetNS(t, "uninst")
	tr, _, err := istio.ParseTraffic(map[string]string{istio.AnnotationStatus: "{}"}, istio.DefaultDefaults())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddPod(datapath.Pod{NetnsPath: ns.Path(), Traffic: tr}); err != nil {
		t.Fatal(err)
	}
	return cg, pin, ns
}

// TestUninstall: with the wrong pin directory uninstall must not claim
// success while programs stay attached; it says what it found and where.
// With the right one everything goes.
func TestUninstall(t *testing.T) {
	cg, pin, ns := attachForTest(t)
	if n := attached(t, cg.Path, cgroupHooks...); n != 4 {
		t.Fatalf("programs on the test cgroup: %d, want 4", n)
	}

	for _, wrong := range []string{pin + "-wrong", t.TempDir()} {
		err := runUninstall(context.Background(), []string{"--pin-dir", wrong, "--cgroup", cg.Path, "--drain", "0"})
		if err == nil {
			t.Fatalf("uninstall --pin-dir %s succeeded while the programs stay attached to %s", wrong, cg.Path)
		}
		t.Logf("uninstall --pin-dir %s: %v", wrong, err)
		for _, want := range []string{wrong, cg.Path, pin, "ms_connect4", "ms_sockops", "--pin-dir " + pin, "1 sk_lookup link"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("uninstall --pin-dir %s: error does not name %q:\n%v", wrong, want, err)
			}
		}
		if n := attached(t, cg.Path, cgroupHooks...); n != 4 {
			t.Fatalf("programs on the test cgroup after a failed uninstall: %d, want 4", n)
		}
	}

	if err := runUninstall(context.Background(), []string{"--pin-dir", pin, "--cgroup", cg.Path, "--drain", "0"}); err != nil {
		t.Fatal(err)
	}
	if n := attached(t, cg.Path, cgroupHooks...); n != 0 {
		t.Fatalf("programs on the test cgroup after uninstall: %d", n)
	}
	if n := attached(t, ns.Path(), ebpf.AttachSkLookup); n != 0 {
		t.Fatalf("sk_lookup programs on the pod netns after uninstall: %d", n)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		t.Fatalf("pin dir after uninstall: %v", err)
	}
	// Again: nothing left, nothing to do, no error.
	if err := runUninstall(context.Background(), []string{"--pin-dir", pin, "--cgroup", cg.Path, "--drain", "0"}); err != nil {
		t.Fatalf("second uninstall: %v", err)
	}
}

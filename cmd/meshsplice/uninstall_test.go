package main

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/internal/dptest"
)

// TestUninstall: with the wrong pin directory uninstall must not claim
// success while programs stay attached; it says what it found and where.
// With the right one everything goes.
func TestUninstall(t *testing.T) {
	a := dptest.Attach(t)
	a.DP.Close() // as an agent that has stopped leaves it
	cg, pin, ns := a.Cgroup, a.PinDir, a.Pod
	attached := func(target string, hooks ...ebpf.AttachType) int { return len(dptest.Programs(t, target, hooks...)) }
	if n := attached(cg.Path, dptest.CgroupHooks...); n != 4 {
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
		if n := attached(cg.Path, dptest.CgroupHooks...); n != 4 {
			t.Fatalf("programs on the test cgroup after a failed uninstall: %d, want 4", n)
		}
	}

	if err := runUninstall(context.Background(), []string{"--pin-dir", pin, "--cgroup", cg.Path, "--drain", "0"}); err != nil {
		t.Fatal(err)
	}
	if n := attached(cg.Path, dptest.CgroupHooks...); n != 0 {
		t.Fatalf("programs on the test cgroup after uninstall: %d", n)
	}
	if n := attached(ns.Path(), ebpf.AttachSkLookup); n != 0 {
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

package kubenode

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestSnapshotDiff: the host check of make e2e-node sees what a node
// could leave behind: an address on lo and a new nft table (here the
// test's own, removed at the end), and nothing when the host is as before.
func TestSnapshotDiff(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root (ip addr, nft)")
	}
	before, err := TakeSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if d := before.Diff(before); len(d) != 0 {
		t.Fatalf("a snapshot differs from itself: %v", d)
	}
	const addr = "10.245.254.1/32" // not the node IP
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	run("ip", "addr", "add", addr, "dev", "lo")
	t.Cleanup(func() { exec.Command("ip", "addr", "del", addr, "dev", "lo").Run() })
	run("nft", "add", "table", "inet", "mstest_snapshot")
	t.Cleanup(func() { exec.Command("nft", "delete", "table", "inet", "mstest_snapshot").Run() })
	after, err := TakeSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	d := strings.Join(before.Diff(after), "\n")
	for _, want := range []string{"lo's addresses", "nft tables"} {
		if !strings.Contains(d, want) {
			t.Errorf("Diff does not report the change of %s:\n%s", want, d)
		}
	}
}

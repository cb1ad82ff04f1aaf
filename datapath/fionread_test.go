package datapath_test

import (
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/datapath"
)

// TestProbeFionread: the probe measures the kernel, and says which answer
// it got. Linux 6.18 counts only the BPF queue (docs/readers.md, e2e
// TestFionreadInEveryMix measures the same through real spliced pods), so
// the probe must say "short" there; a kernel that counts TCP bytes too
// would say "right".
func TestProbeFionread(t *testing.T) {
	r := datapath.ProbeFionread()
	t.Logf("%s: %s", r.Name, r.Detail)
	if strings.HasSuffix(r.Name, "not measured") {
		t.Fatalf("probe failed: %s", r.Detail)
	}
	if r.OK != strings.HasSuffix(r.Name, ": right") {
		t.Fatalf("OK %v with %q", r.OK, r.Name)
	}
}

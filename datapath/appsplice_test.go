package datapath_test

import (
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/datapath"
)

// TestAppSpliceDefault: app sockets are spliced by default only where both
// traps are solved by the kernel: splice(2) reads refused (guarded, not
// only detected) and FIONREAD right after a fallback; otherwise the reason
// names each one that is not.
func TestAppSpliceDefault(t *testing.T) {
	right := datapath.ProbeResult{Name: "FIONREAD ...: right", OK: true}
	short := datapath.ProbeResult{Name: "FIONREAD ...: short"}
	for _, tc := range []struct {
		readers  string
		fionread datapath.ProbeResult
		want     bool
		why      []string
	}{
		{datapath.ReadersGuarded, right, true, nil},
		{datapath.ReadersGuarded, short, false, []string{"FIONREAD ...: short"}},
		{datapath.ReadersDetected, right, false, []string{"detected, not refused"}},
		{datapath.ReadersUnprotected, short, false, []string{"unprotected, not refused", "short"}},
	} {
		got, why := datapath.AppSpliceDefault(tc.readers, tc.fionread)
		if got != tc.want {
			t.Errorf("%s, %s: %v (%s), want %v", tc.readers, tc.fionread.Name, got, why, tc.want)
		}
		for _, w := range tc.why {
			if !strings.Contains(why, w) {
				t.Errorf("%s, %s: reason %q lacks %q", tc.readers, tc.fionread.Name, why, w)
			}
		}
		r := datapath.ProbeAppSpliceDefault(datapath.ProbeResult{Name: "splice(2) readers of spliced sockets: " + tc.readers}, tc.fionread)
		if r.OK != tc.want || (!r.OK && !strings.Contains(r.Detail, "meshsplice.io/app-splice")) {
			t.Errorf("check for %s, %s: %+v", tc.readers, tc.fionread.Name, r)
		}
	}
}

package agent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestRegistrations reads pods.json by netns cookie; a missing file is no
// pod, a corrupt one an error.
func TestRegistrations(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string // "": no pods.json
		want    map[uint64]string
		wantErr error
	}{
		{"no state", "", map[uint64]string{}, nil},
		{"two pods", `[{"registration": {"containerID": "a", "podName": "web-0", "annotations": {"x": "y"}}, "netns_cookie": 7},
		               {"registration": {"containerID": "b", "podName": "db-0"}, "netns_cookie": 9}]`, map[uint64]string{7: "web-0", 9: "db-0"}, nil},
		{"corrupt", `[{"registration": {"containerID": "a"}}]`, nil, errCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.file != "" {
				if err := os.WriteFile(filepath.Join(dir, "pods.json"), []byte(tc.file), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			regs, err := Registrations(dir)
			if !errors.Is(err, tc.wantErr) || (err != nil) != (tc.wantErr != nil) {
				t.Fatalf("Registrations: %v, want %v", err, tc.wantErr)
			}
			if len(regs) != len(tc.want) {
				t.Fatalf("Registrations: %d pods, want %d", len(regs), len(tc.want))
			}
			for cookie, name := range tc.want {
				if regs[cookie].PodName != name {
					t.Errorf("cookie %d: pod %q, want %q", cookie, regs[cookie].PodName, name)
				}
			}
			if tc.name == "two pods" && regs[7].Annotations["x"] != "y" {
				t.Errorf("annotations lost: %v", regs[7].Annotations)
			}
		})
	}
}

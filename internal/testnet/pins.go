package testnet

import (
	"path/filepath"
	"testing"

	"github.com/meshsplice/meshsplice/internal/lab"
)

// PinDir returns a fresh directory on bpffs (/sys/fs/bpf/mstest-<random>),
// mounting bpffs first if the machine has none. At cleanup it calls detach
// with the directory (pass the datapath's Detach) and fails the test if
// anything is left pinned there (lab.UnpinDir).
func PinDir(tb testing.TB, detach func(dir string) error) string {
	tb.Helper()
	RequireRoot(tb)
	if err := lab.MountBPFFS(); err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	dir := filepath.Join(lab.BPFFSRoot, Prefix+randomSuffix(8))
	recordCreated(dir)
	tb.Cleanup(func() {
		if err := lab.UnpinDir(dir, detach); err != nil {
			tb.Errorf("testnet: %v", err)
		}
	})
	return dir
}

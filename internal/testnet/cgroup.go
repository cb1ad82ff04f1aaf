package testnet

import (
	"path/filepath"
	"testing"

	"github.com/meshsplice/meshsplice/internal/cgroups"
	"github.com/meshsplice/meshsplice/internal/lab"
)

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy (see
// cgroups.Mount).
func Cgroup2Mount() (string, error) { return cgroups.Mount() }

// Cgroup is a cgroup v2 directory created for one test: Path, FD,
// SysProcAttr, ID, RelPath, Procs, AddProc, Kill (see lab.Cgroup).
type Cgroup = lab.Cgroup

// NewCgroup creates a fresh cgroup named mstest-<random> directly under the
// cgroup2 mount. Its cleanup kills every process left in it (cgroup.kill, or
// SIGKILL to each pid when cgroup.kill does not exist), waits until it is
// empty and removes the directory.
func NewCgroup(tb testing.TB) *Cgroup {
	tb.Helper()
	mnt, err := Cgroup2Mount()
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	path := filepath.Join(mnt, Prefix+randomSuffix(8))
	cg, err := lab.CreateCgroup(path)
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	recordCreated(path)
	tb.Cleanup(func() {
		if err := cg.Remove(); err != nil {
			tb.Errorf("testnet: remove cgroup %s: %v", path, err)
		}
	})
	return cg
}

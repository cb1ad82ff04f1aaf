package testnet

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// PinDir returns a fresh directory on bpffs (/sys/fs/bpf/mstest-<random>),
// mounting bpffs first if the machine has none. At cleanup it calls detach
// with the directory (pass the datapath's Detach) and fails the test if
// anything is left pinned there.
func PinDir(tb testing.TB, detach func(dir string) error) string {
	tb.Helper()
	RequireRoot(tb)
	const root = "/sys/fs/bpf"
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		if err := unix.Mount("bpf", root, "bpf", 0, ""); err != nil {
			tb.Fatalf("mount bpffs at %s: %v", root, err)
		}
	}
	dir := filepath.Join(root, "mstest-"+randomSuffix(8))
	recordCreated(dir)
	tb.Cleanup(func() {
		if err := detach(dir); err != nil {
			tb.Errorf("detach %s: %v", dir, err)
		}
		var left []string
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && p != dir {
				left = append(left, p)
			}
			return nil
		})
		if len(left) > 0 {
			tb.Errorf("left pinned after detach: %v", left)
		}
		if err := os.RemoveAll(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			tb.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

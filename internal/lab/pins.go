package lab

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// PinDir creates the bpffs directory /sys/fs/bpf/<Prefix> (mounting bpffs
// first if the machine has none) and registers its removal: detach must
// unpin what was pinned below it (e.g. datapath.Detach for each
// subdirectory handed to a datapath); anything left is an error.
func (l *Lab) PinDir(detach func(dir string) error) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFSRoot, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		if err := unix.Mount("bpf", BPFFSRoot, "bpf", 0, ""); err != nil {
			return "", fmt.Errorf("mount bpffs at %s: %w", BPFFSRoot, err)
		}
	}
	dir := filepath.Join(BPFFSRoot, l.Prefix)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("create pin dir: %w", err)
	}
	l.Defer("unpin "+dir, func() error {
		err := detach(dir)
		var left []string
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, werr error) error {
			if werr == nil && p != dir && !d.IsDir() {
				left = append(left, p)
			}
			return nil
		})
		if len(left) > 0 {
			err = errors.Join(err, fmt.Errorf("left pinned: %v", left))
		}
		if rerr := os.RemoveAll(dir); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
		return err
	})
	return dir, nil
}

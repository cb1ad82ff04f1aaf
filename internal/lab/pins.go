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
// first if the machine has none) and registers its removal with UnpinDir:
// detach must unpin what was pinned below it (e.g. datapath.Detach for each
// subdirectory handed to a datapath); anything left is an error.
func (l *Lab) PinDir(detach func(dir string) error) (string, error) {
	if err := MountBPFFS(); err != nil {
		return "", err
	}
	dir := filepath.Join(BPFFSRoot, l.Prefix)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("create pin dir: %w", err)
	}
	l.Defer("unpin "+dir, func() error { return UnpinDir(dir, detach) })
	return dir, nil
}

// MountBPFFS mounts bpffs at BPFFSRoot unless it is there already.
func MountBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFSRoot, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		if err := unix.Mount("bpf", BPFFSRoot, "bpf", 0, ""); err != nil {
			return fmt.Errorf("mount bpffs at %s: %w", BPFFSRoot, err)
		}
	}
	return nil
}

// UnpinDir calls detach with dir (it must unpin everything below it), fails
// if a pin is left there, and removes dir. It reports every failure.
func UnpinDir(dir string, detach func(dir string) error) error {
	var errs []error
	if err := detach(dir); err != nil {
		errs = append(errs, fmt.Errorf("detach %s: %w", dir, err))
	}
	var left []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, werr error) error {
		if werr == nil && p != dir && !d.IsDir() {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		errs = append(errs, fmt.Errorf("left pinned after detach: %v", left))
	}
	if err := os.RemoveAll(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

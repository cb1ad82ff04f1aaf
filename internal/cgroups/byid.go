package cgroups

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"syscall"
)

// ErrNotFound is returned by PathByID for an ID no cgroup directory has.
var ErrNotFound = errors.New("no cgroup with this id")

// PathByID finds the cgroup v2 directory whose ID (its inode number, what
// BPF link info and bpf_get_current_cgroup_id report) is id, under the
// cgroup v2 mount.
func PathByID(id uint64) (string, error) {
	root, err := Mount()
	if err != nil {
		return "", err
	}
	found := ""
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // a cgroup removed mid-walk is not an error
		}
		var st syscall.Stat_t
		if syscall.Stat(path, &st) == nil && st.Ino == id {
			found = path
			return fs.SkipAll
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if found == "" {
		return "", fmt.Errorf("%w: %d under %s", ErrNotFound, id, root)
	}
	return found, nil
}

// Package repo holds the tests about the repository itself, not about a
// package: git tracks no compiled program, and every command the READMEs
// show exists (or is run by a test). It has no code of its own; Root and
// TrackedFiles serve its tests.
package repo

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrNotGit is returned by TrackedFiles outside a git checkout (a source
// tarball).
var ErrNotGit = errors.New("not a git checkout")

// Root returns the module's root directory: the nearest parent of the
// working directory holding go.mod.
func Root() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// TrackedFiles lists the files git tracks below root (git ls-files), as
// paths relative to root.
func TrackedFiles(root string) ([]string, error) {
	if _, err := os.Stat(filepath.Join(root, ".git")); err != nil {
		return nil, ErrNotGit
	}
	out, err := exec.Command("git", "-C", root, "ls-files", "-z").Output()
	if err != nil {
		return nil, fmt.Errorf("git ls-files: %w", err)
	}
	var files []string
	for _, f := range strings.Split(string(out), "\x00") {
		if f != "" {
			files = append(files, f)
		}
	}
	return files, nil
}

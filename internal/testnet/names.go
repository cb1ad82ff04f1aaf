package testnet

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
)

// Prefix is the prefix of the name of every network namespace and cgroup
// created by this package.
const Prefix = "mstest-"

// RequireRoot skips the test unless it runs with effective uid 0.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("testnet: test needs root (network namespaces, cgroups, veth)")
	}
}

// randomSuffix returns n random lowercase hex characters.
func randomSuffix(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("testnet: crypto/rand: %v", err))
	}
	return hex.EncodeToString(b)[:n]
}

// created records every path this process created, so that Leftovers can
// tell which of them still exist (other test binaries running in parallel
// may own other mstest-* resources at the same time).
var created = struct {
	sync.Mutex
	paths map[string]bool
}{paths: map[string]bool{}}

func recordCreated(path string) {
	created.Lock()
	defer created.Unlock()
	created.paths[path] = true
}

// Leftovers returns the network namespace files and cgroup directories that
// this process created through this package and that still exist. It is meant
// for TestMain or a final test, after all other tests and their cleanups have
// run; an empty result means everything was removed.
func Leftovers() []string {
	created.Lock()
	defer created.Unlock()
	var left []string
	for p := range created.paths {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			left = append(left, p)
		}
	}
	sort.Strings(left)
	return left
}

// ListLeftovers lists every mstest-* entry of /run/netns, of the cgroup2
// mount and of /sys/fs/bpf, regardless of which process created it. While
// other test binaries run it may list their live resources too.
func ListLeftovers() ([]string, error) {
	var left []string
	dirs := []string{NetNSDir, "/sys/fs/bpf"}
	if mnt, err := Cgroup2Mount(); err == nil {
		dirs = append(dirs, mnt)
	}
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", dir, err)
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), Prefix) {
				left = append(left, filepath.Join(dir, e.Name()))
			}
		}
	}
	return left, nil
}

package testnet

import (
	"errors"
	"os"
	"sort"
	"sync"
	"testing"

	"github.com/meshsplice/meshsplice/internal/lab"
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
func randomSuffix(n int) string { return lab.RandomSuffix(n) }

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
func ListLeftovers() ([]string, error) { return lab.Leftovers(Prefix) }

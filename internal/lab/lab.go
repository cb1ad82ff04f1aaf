// Package lab builds and tears down the machinery of a local network lab:
// named network namespaces, bridged "nodes" with veth-attached pods, routed
// links between nodes, cgroups, bpffs pin directories, and processes
// started inside a namespace and a cgroup from their first instruction,
// pinned to CPUs, with their JSON event lines parsed. It is the one
// implementation of these for the benchmark (meshsplice bench), the demo
// (meshsplice demo) and the tests: package internal/testnet is its
// testing.TB layer (names, t.Cleanup, t.Fatal), nothing more.
//
// The plain functions (NewNamedNetns, CreateCgroup, Start, AttachPod, ...)
// create one thing and return what undoes it. A Lab strings them together:
// everything it creates is named after its prefix (e.g. msbench-1a2b3c) and
// registered for removal; Close removes it in reverse order and reports
// every failure, and Leftovers lists whatever still exists.
package lab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/hashicorp/go-multierror"

	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// BPFFSRoot is where bpffs is (or gets) mounted.
const BPFFSRoot = "/sys/fs/bpf"

// Lab owns every resource it created and removes them on Close.
type Lab struct {
	// Prefix starts the name of every namespace, cgroup and pin directory
	// the lab creates.
	Prefix string
	// Log receives what the lab does; never nil.
	Log *slog.Logger

	mu       sync.Mutex
	cleanups []cleanup
	closed   bool
}

type cleanup struct {
	what string
	fn   func() error
}

// New returns a lab whose resources are named <base>-<random>-..., e.g.
// msbench-1a2b3c-node-a. log may be nil.
func New(base string, log *slog.Logger) (*Lab, error) {
	return Named(base+"-"+RandomSuffix(6), log)
}

// Named returns a lab whose resources are named <prefix>-... exactly, for
// a program that must find what an earlier run of it left (meshsplice
// demo). log may be nil.
func Named(prefix string, log *slog.Logger) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: needs root (network namespaces, cgroups, BPF)")
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Lab{Prefix: prefix, Log: log}, nil
}

// Name returns the lab's name for a resource: <Prefix>-<name>.
func (l *Lab) Name(name string) string { return l.Prefix + "-" + name }

// Defer registers fn to run at Close, before everything registered earlier.
func (l *Lab) Defer(what string, fn func() error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cleanups = append(l.cleanups, cleanup{what, fn})
}

// Close runs the registered cleanups in reverse order, every one of them
// even when some fail, and then checks that nothing named after the lab's
// prefix is left. Calling it again does nothing.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	cs := l.cleanups
	l.cleanups = nil
	l.mu.Unlock()
	var result *multierror.Error
	for _, c := range slices.Backward(cs) {
		if err := c.fn(); err != nil {
			result = multierror.Append(result, fmt.Errorf("%s: %w", c.what, err))
		}
	}
	if left, err := Leftovers(l.Prefix); err != nil {
		result = multierror.Append(result, err)
	} else if len(left) > 0 {
		result = multierror.Append(result, fmt.Errorf("left behind: %s", strings.Join(left, ", ")))
	}
	return result.ErrorOrNil()
}

// RandomSuffix returns n random lowercase hex characters.
func RandomSuffix(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("lab: crypto/rand: %v", err))
	}
	return hex.EncodeToString(b)[:n]
}

// Leftovers lists the network namespaces (/run/netns), cgroups (under the
// cgroup v2 mount) and bpffs entries whose names start with prefix.
func Leftovers(prefix string) ([]string, error) {
	dirs := []string{NetnsDir, BPFFSRoot}
	if mnt, err := cgroups.Mount(); err == nil {
		dirs = append(dirs, mnt)
	}
	var left []string
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", dir, err)
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix) {
				left = append(left, filepath.Join(dir, e.Name()))
			}
		}
	}
	return left, nil
}

// RemoveLeftovers removes what Leftovers(prefix) finds, for labs whose
// process was killed before it could clean up: it kills the processes of
// matching cgroups and removes them, unmounts and removes matching
// namespace files, and hands matching pin directories to detach (which
// must unpin and remove them, e.g. a datapath's Detach for each
// subdirectory). It reports every failure.
func RemoveLeftovers(prefix string, detach func(pinDir string) error) error {
	left, err := Leftovers(prefix)
	if err != nil {
		return err
	}
	var result *multierror.Error
	for _, p := range left {
		var err error
		switch {
		case strings.HasPrefix(p, NetnsDir+"/"):
			err = RemoveNetns(p)
		case strings.HasPrefix(p, BPFFSRoot+"/"):
			err = detach(p)
		default:
			err = removeCgroupTree(p)
		}
		if err != nil {
			result = multierror.Append(result, fmt.Errorf("remove %s: %w", p, err))
		}
	}
	return result.ErrorOrNil()
}

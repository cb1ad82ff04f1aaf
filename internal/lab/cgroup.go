package lab

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// Cgroup is a cgroup v2 directory the lab created.
type Cgroup struct {
	// Path is the cgroup's directory.
	Path string
	fd   int
}

// NewCgroup creates the cgroup <cgroup v2 mount>/<Prefix>, the lab's root
// cgroup, never the machine's root. Its removal kills every process left
// in it or below it.
func (l *Lab) NewCgroup() (*Cgroup, error) {
	mnt, err := cgroups.Mount()
	if err != nil {
		return nil, err
	}
	return l.newCgroupAt(filepath.Join(mnt, l.Prefix))
}

// Child creates the cgroup name below cg and registers its removal.
func (l *Lab) Child(cg *Cgroup, name string) (*Cgroup, error) {
	return l.newCgroupAt(filepath.Join(cg.Path, name))
}

func (l *Lab) newCgroupAt(path string) (*Cgroup, error) {
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	fd, err := unix.Open(path, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("open cgroup %s: %w", path, err)
	}
	cg := &Cgroup{Path: path, fd: fd}
	l.Defer("remove cgroup "+path, func() error {
		unix.Close(fd)
		return removeCgroupTree(path)
	})
	return cg, nil
}

// FD is a descriptor of the cgroup directory, for clone3's
// CLONE_INTO_CGROUP; it stays open until the lab closes.
func (cg *Cgroup) FD() int { return cg.fd }

// CPU is the CPU time a cgroup's processes used.
type CPU struct {
	Total, User, System time.Duration
}

// Sub returns c - o.
func (c CPU) Sub(o CPU) CPU {
	return CPU{c.Total - o.Total, c.User - o.User, c.System - o.System}
}

// Usage returns the CPU time used by the cgroup's processes (and those of
// its descendants) since it was created: usage_usec, user_usec and
// system_usec of cpu.stat, which exists without the cpu controller. Without
// CONFIG_IRQ_TIME_ACCOUNTING softirq work done in a process's context (the
// receive side of loopback and veth traffic it sends) counts as its system
// time.
func (cg *Cgroup) Usage() (CPU, error) {
	f, err := os.Open(filepath.Join(cg.Path, "cpu.stat"))
	if err != nil {
		return CPU{}, fmt.Errorf("cpu usage of %s: %w", cg.Path, err)
	}
	defer f.Close()
	var c CPU
	found := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		var dst *time.Duration
		switch k {
		case "usage_usec":
			dst = &c.Total
		case "user_usec":
			dst = &c.User
		case "system_usec":
			dst = &c.System
		default:
			continue
		}
		us, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return CPU{}, fmt.Errorf("cpu usage of %s: %s: %w", cg.Path, k, err)
		}
		*dst = time.Duration(us) * time.Microsecond
		found++
	}
	if err := sc.Err(); err != nil {
		return CPU{}, fmt.Errorf("cpu usage of %s: %w", cg.Path, err)
	}
	if found != 3 {
		return CPU{}, fmt.Errorf("cpu usage of %s: cpu.stat lacks usage_usec, user_usec or system_usec", cg.Path)
	}
	return c, nil
}

// removeCgroupTree kills every process of the cgroup at path and its
// descendants (cgroup.kill acts on the whole subtree) and removes the
// directories bottom-up.
func removeCgroupTree(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if populated(path) {
			if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0); err != nil {
				return fmt.Errorf("kill processes of %s: %w", path, err)
			}
		}
		var dirs []string
		filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		var last error
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
				last = fmt.Errorf("rmdir %s: %w", dirs[i], err)
			}
		}
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return last
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// populated reports whether a process lives in the cgroup's subtree.
func populated(path string) bool {
	b, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
	if err != nil {
		return false
	}
	return strings.Contains(string(b), "populated 1")
}

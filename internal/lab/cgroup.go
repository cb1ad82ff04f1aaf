package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// Cgroup is a cgroup v2 directory made by CreateCgroup (a Lab, a test).
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
	cg, err := CreateCgroup(path)
	if err != nil {
		return nil, err
	}
	l.Defer("remove cgroup "+path, cg.Remove)
	return cg, nil
}

// CreateCgroup creates the cgroup directory path (below the cgroup v2
// mount) and opens it; Remove undoes it.
func CreateCgroup(path string) (*Cgroup, error) {
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	fd, err := unix.Open(path, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("open cgroup %s: %w", path, err)
	}
	return &Cgroup{Path: path, fd: fd}, nil
}

// Remove kills every process of the cgroup and of its descendants and
// removes them all.
func (cg *Cgroup) Remove() error {
	unix.Close(cg.fd)
	return removeCgroupTree(cg.Path)
}

// FD is a read-only descriptor of the cgroup directory, for clone3's
// CLONE_INTO_CGROUP or for attaching cgroup BPF programs; it stays open
// until Remove. Do not close it.
func (cg *Cgroup) FD() int { return cg.fd }

// SysProcAttr returns process attributes that start a child inside the
// cgroup from its first instruction.
func (cg *Cgroup) SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg.fd}
}

// ID returns the cgroup id, the inode number of the cgroup directory, as
// bpf_get_current_cgroup_id returns it for tasks in the cgroup.
func (cg *Cgroup) ID() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(cg.fd, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", cg.Path, err)
	}
	return st.Ino, nil
}

// RelPath returns the cgroup's path relative to the cgroup v2 mount with a
// leading slash, as the "0::" line of /proc/PID/cgroup shows it.
func (cg *Cgroup) RelPath() string {
	if mnt, err := cgroups.Mount(); err == nil {
		if rel, err := filepath.Rel(mnt, cg.Path); err == nil && !strings.HasPrefix(rel, "..") {
			return "/" + rel
		}
	}
	return "/" + filepath.Base(cg.Path)
}

// Procs returns the pids of the processes in the cgroup (not those of its
// descendants).
func (cg *Cgroup) Procs() ([]int, error) {
	data, err := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("read cgroup.procs: %w", err)
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("parse cgroup.procs entry %q: %w", f, err)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// AddProc moves an existing process into the cgroup. Sockets the process
// already created keep their original cgroup; prefer starting processes in
// the cgroup (Start, SysProcAttr).
func (cg *Cgroup) AddProc(pid int) error {
	if err := os.WriteFile(filepath.Join(cg.Path, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("move pid %d into cgroup %s: %w", pid, cg.Path, err)
	}
	return nil
}

// Kill kills every process of the cgroup and its descendants and waits
// until none is left.
func (cg *Cgroup) Kill() error { return killCgroupTree(cg.Path) }

// CPU is the CPU time a cgroup's processes used.
type CPU struct {
	Total, User, System time.Duration
}

// Sub returns c - o.
func (c CPU) Sub(o CPU) CPU {
	return CPU{c.Total - o.Total, c.User - o.User, c.System - o.System}
}

// Usage returns the CPU time used by the cgroup's processes (and those of
// its descendants) since it was created (cgroups.CPUStat). Without
// CONFIG_IRQ_TIME_ACCOUNTING softirq work done in a process's context (the
// receive side of loopback and veth traffic it sends) counts as its system
// time.
func (cg *Cgroup) Usage() (CPU, error) {
	total, user, system, err := cgroups.CPUStat(cg.Path)
	return CPU{Total: total, User: user, System: system}, err
}

// killCgroupTree kills every process of the cgroup at path and of its
// descendants (cgroup.kill acts on the whole subtree; SIGKILL to each pid
// where the kernel has no cgroup.kill) and waits until none is left.
func killCgroupTree(path string) error {
	deadline := time.Now().Add(10 * time.Second)
	for populated(path) {
		if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("kill processes of %s: %w", path, err)
			}
			killEach(path)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes still in cgroup %s 10s after kill", path)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// killEach sends SIGKILL to every process of the cgroup tree at path.
func killEach(path string) {
	filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				unix.Kill(pid, unix.SIGKILL)
			}
		}
		return nil
	})
}

// removeCgroupTree kills every process of the cgroup at path and its
// descendants and removes the directories bottom-up.
func removeCgroupTree(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	killErr := killCgroupTree(path)
	deadline := time.Now().Add(5 * time.Second)
	for {
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
			return killErr
		}
		if time.Now().After(deadline) {
			return errors.Join(killErr, last)
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

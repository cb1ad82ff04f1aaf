package testnet

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy (see
// cgroups.Mount).
func Cgroup2Mount() (string, error) { return cgroups.Mount() }

// Cgroup is a cgroup v2 directory created for one test.
type Cgroup struct {
	// Path is the absolute path of the cgroup directory, e.g.
	// /sys/fs/cgroup/unified/mstest-1a2b3c4d.
	Path string

	fd int
}

// NewCgroup creates a fresh cgroup named mstest-<random> directly under the
// cgroup2 mount. Its cleanup kills every process left in it (cgroup.kill, or
// SIGKILL to each pid when cgroup.kill does not exist), waits until it is
// empty and removes the directory.
func NewCgroup(tb testing.TB) *Cgroup {
	tb.Helper()
	mnt, err := Cgroup2Mount()
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	path := filepath.Join(mnt, Prefix+randomSuffix(8))
	if err := os.Mkdir(path, 0o755); err != nil {
		tb.Fatalf("testnet: create cgroup: %v", err)
	}
	recordCreated(path)
	fd, err := unix.Open(path, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = os.Remove(path)
		tb.Fatalf("testnet: open cgroup %s: %v", path, err)
	}
	cg := &Cgroup{Path: path, fd: fd}
	tb.Cleanup(func() {
		if err := cg.destroy(); err != nil {
			tb.Errorf("testnet: remove cgroup %s: %v", path, err)
		}
	})
	return cg
}

// FD returns a read-only descriptor of the cgroup directory, for
// SysProcAttr{UseCgroupFD: true, CgroupFD: cg.FD()} (clone3 with
// CLONE_INTO_CGROUP), or for attaching cgroup BPF programs. It stays valid
// until the test's cleanup; do not close it.
func (cg *Cgroup) FD() int { return cg.fd }

// SysProcAttr returns process attributes that start a child inside the cgroup
// from its first instruction.
func (cg *Cgroup) SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg.fd}
}

// ID returns the cgroup id, the inode number of the cgroup directory, as
// returned by bpf_get_current_cgroup_id for tasks in the cgroup.
func (cg *Cgroup) ID() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(cg.fd, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", cg.Path, err)
	}
	return st.Ino, nil
}

// RelPath returns the cgroup's path relative to the cgroup2 mount with a
// leading slash, as it appears in the "0::" line of /proc/PID/cgroup.
func (cg *Cgroup) RelPath() string {
	return "/" + filepath.Base(cg.Path)
}

// Procs returns the pids of the processes in the cgroup.
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
// the cgroup with SysProcAttr or Start.
func (cg *Cgroup) AddProc(pid int) error {
	err := os.WriteFile(filepath.Join(cg.Path, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
	if err != nil {
		return fmt.Errorf("move pid %d into cgroup %s: %w", pid, cg.Path, err)
	}
	return nil
}

// Kill kills every process in the cgroup and waits until it is empty.
func (cg *Cgroup) Kill() error {
	deadline := time.Now().Add(10 * time.Second)
	killFile := filepath.Join(cg.Path, "cgroup.kill")
	useKillFile := true
	for {
		pids, err := cg.Procs()
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still in cgroup after kill", pids)
		}
		killed := false
		if useKillFile {
			if err := os.WriteFile(killFile, []byte("1"), 0); err == nil {
				killed = true
			} else {
				useKillFile = false
			}
		}
		if !killed {
			for _, pid := range pids {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (cg *Cgroup) destroy() error {
	killErr := cg.Kill()
	_ = unix.Close(cg.fd)
	var err error
	for i := 0; i < 250; i++ {
		err = unix.Rmdir(cg.Path)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return killErr
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.Join(killErr, fmt.Errorf("rmdir: %w", err))
}

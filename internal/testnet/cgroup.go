package testnet

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy, found by
// parsing /proc/self/mountinfo for a filesystem of type "cgroup2". In hybrid
// mode this is typically /sys/fs/cgroup/unified, in unified mode
// /sys/fs/cgroup. It returns an error when no cgroup2 filesystem is mounted.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("open mountinfo: %w", err)
	}
	defer f.Close()
	return parseCgroup2Mount(f)
}

// parseCgroup2Mount returns the first cgroup2 mount point in mountinfo data.
//
// A mountinfo line is
//
//	36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//
// with the mount point in the fifth field, a variable number of optional
// fields ended by "-", and the filesystem type right after it.
func parseCgroup2Mount(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 {
			continue
		}
		sep := -1
		for i := 6; i < len(fields); i++ {
			if fields[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+1 >= len(fields) {
			continue
		}
		if fields[sep+1] == "cgroup2" {
			return unescapeMountinfo(fields[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	return "", errors.New("no cgroup2 filesystem mounted (no \"cgroup2\" entry in /proc/self/mountinfo); mount one, e.g. mount -t cgroup2 none /sys/fs/cgroup/unified")
}

// unescapeMountinfo undoes the octal escaping (\040 for space, \011, \012,
// \134) that the kernel applies to paths in mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

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

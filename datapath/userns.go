package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrUserNamespace is returned for a pod whose network namespace belongs to
// a user namespace (Kubernetes hostUsers: false) that meshsplice cannot map
// the proxy's uid/gid through.
var ErrUserNamespace = errors.New("pod user namespace")

// unmappedID is what a uid or gid that the pod's user namespace does not map
// becomes: it matches no process, as iptables' owner match then matches
// none (make_kuid gives INVALID_UID).
const unmappedID = math.MaxUint32

// proxyIDsOnHost turns the proxy's uid and gid, as the pod sees them, into
// the ids the kernel's programs see (bpf_get_current_uid_gid: the initial
// user namespace's view). iptables' owner match reads "--uid-owner 1337"
// in the user namespace that owns the pod's network namespace; for a pod
// with its own user namespace (hostUsers: false) 1337 inside is, say,
// 101337 outside, and comparing 1337 with 101337 would capture the proxy's
// own connections again (a loop).
//
// The owning user namespace comes from the network namespace
// (NS_GET_USERNS); its uid_map and gid_map are read from a process that
// lives in it (a network namespace alone does not show them). With no such
// process, or a map that cannot be read, it fails with ErrUserNamespace.
func proxyIDsOnHost(netnsPath string, uid, gid uint32) (uint32, uint32, error) {
	f, err := os.Open(netnsPath)
	if err != nil {
		return 0, 0, fmt.Errorf("open netns: %w", err)
	}
	defer f.Close()
	fd, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_USERNS)
	if err != nil {
		return 0, 0, fmt.Errorf("%w: owner of %s: %w", ErrUserNamespace, netnsPath, err)
	}
	defer unix.Close(fd)
	var owner, self unix.Stat_t
	if err := unix.Fstat(fd, &owner); err != nil {
		return 0, 0, fmt.Errorf("%w: %w", ErrUserNamespace, err)
	}
	if err := unix.Stat("/proc/self/ns/user", &self); err != nil {
		return 0, 0, fmt.Errorf("%w: %w", ErrUserNamespace, err)
	}
	if owner.Ino == self.Ino && owner.Dev == self.Dev {
		return uid, gid, nil // the host's user namespace: ids as they are
	}
	pid, err := processInUserns(owner.Ino)
	if err != nil {
		return 0, 0, fmt.Errorf("%w: network namespace %s belongs to user namespace %d (hostUsers: false?): %w",
			ErrUserNamespace, netnsPath, owner.Ino, err)
	}
	dir := filepath.Join("/proc", strconv.Itoa(pid))
	hostUID, err := mapID(filepath.Join(dir, "uid_map"), uid)
	if err != nil {
		return 0, 0, fmt.Errorf("%w: %w", ErrUserNamespace, err)
	}
	hostGID, err := mapID(filepath.Join(dir, "gid_map"), gid)
	if err != nil {
		return 0, 0, fmt.Errorf("%w: %w", ErrUserNamespace, err)
	}
	return hostUID, hostGID, nil
}

// processInUserns finds a process whose user namespace has inode ino.
func processInUserns(ino uint64) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name(), "ns", "user"), &st) == nil && st.Ino == ino {
			return pid, nil
		}
	}
	return 0, errors.New("no process lives in it, so its uid_map cannot be read")
}

// mapID maps id (inside) through an id map file (/proc/PID/uid_map: lines
// "inside outside count", outside relative to the reader's namespace).
func mapID(path string, id uint32) (uint32, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 {
			continue
		}
		var v [3]uint64
		for i, s := range fields {
			if v[i], err = strconv.ParseUint(s, 10, 32); err != nil {
				return 0, fmt.Errorf("%s: %q: %w", path, sc.Text(), err)
			}
		}
		if uint64(id) >= v[0] && uint64(id) < v[0]+v[2] {
			return uint32(v[1] + uint64(id) - v[0]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return unmappedID, nil
}

// Package cgroups finds the cgroup v2 hierarchy, which meshsplice attaches
// its programs to. Never hard-code /sys/fs/cgroup: in hybrid mode (as on
// Debian 12 with a v1 systemd) cgroup v2 lives at /sys/fs/cgroup/unified.
package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Mount returns the mount point of the cgroup v2 hierarchy, found by
// parsing /proc/self/mountinfo for a filesystem of type "cgroup2". In hybrid
// mode this is typically /sys/fs/cgroup/unified, in unified mode
// /sys/fs/cgroup. It returns an error when no cgroup2 filesystem is mounted.
func Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("open mountinfo: %w", err)
	}
	defer f.Close()
	return parseMount(f)
}

// parseMount returns the first cgroup2 mount point in mountinfo data.
func parseMount(r io.Reader) (string, error) {
	mounts, err := parseMounts(r, "cgroup2")
	if err != nil {
		return "", err
	}
	if len(mounts) == 0 {
		return "", errors.New("no cgroup2 filesystem mounted (no \"cgroup2\" entry in /proc/self/mountinfo); mount one, e.g. mount -t cgroup2 none /sys/fs/cgroup/unified")
	}
	return mounts[0], nil
}

// MountsOfType returns the mount points of every filesystem of type fstype
// ("bpf", "cgroup2") in /proc/self/mountinfo, in mount order.
func MountsOfType(fstype string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("open mountinfo: %w", err)
	}
	defer f.Close()
	return parseMounts(f, fstype)
}

// parseMounts returns the mount points of type fstype in mountinfo data.
//
// A mountinfo line is
//
//	36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//
// with the mount point in the fifth field, a variable number of optional
// fields ended by "-", and the filesystem type right after it.
func parseMounts(r io.Reader, fstype string) ([]string, error) {
	var out []string
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
		if fields[sep+1] == fstype {
			out = append(out, unescapeMountinfo(fields[4]))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return out, nil
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

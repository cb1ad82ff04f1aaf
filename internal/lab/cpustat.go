package lab

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat times (100 on every
// Linux ABI).
const clockTicks = 100

// ProcTimes maps a pid to the CPU time (user + system) the process has
// used.
type ProcTimes map[int]time.Duration

// OtherProcs reads the CPU time of every user-space process of the machine
// except this one and those in the cgroups under cgroupDir (kernel threads
// are left out: they mostly do work the measured processes cause, such as
// softirq processing). Taken before and after a measurement, it tells
// whether other programs competed for the CPUs (see Foreign). Times come
// from /proc/PID/stat, in 10 ms ticks.
func OtherProcs(cgroupDir string) (ProcTimes, error) {
	ours := map[int]bool{os.Getpid(): true}
	err := filepath.WalkDir(cgroupDir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				ours[pid] = true
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list /proc: %w", err)
	}
	t := ProcTimes{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || ours[pid] {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // exited
		}
		// pid (comm) state ppid ... utime(14) stime(15); comm may hold
		// spaces and parentheses: split after the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		if pid == 2 || ppid == 2 {
			continue // kernel threads
		}
		ut, err1 := strconv.ParseInt(f[11], 10, 64)
		st, err2 := strconv.ParseInt(f[12], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		t[pid] = time.Duration(ut+st) * time.Second / clockTicks
	}
	return t, nil
}

// Foreign returns the CPU time other processes used between before and
// after (all of it for a process born in between).
func Foreign(before, after ProcTimes) time.Duration {
	var sum time.Duration
	for pid, t := range after {
		sum += max(0, t-before[pid])
	}
	return sum
}

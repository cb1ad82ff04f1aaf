package cgroups

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// CPUStat returns the CPU time used by the processes of the cgroup at dir
// (and of its descendants) since it was created: usage_usec, user_usec and
// system_usec of its cpu.stat, which exists without the cpu controller and
// is world-readable. The benchmark's clients read it themselves at the
// edges of their measurement windows.
func CPUStat(dir string) (total, user, system time.Duration, err error) {
	f, err := os.Open(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, 0, 0, fmt.Errorf("cpu usage of %s: %w", dir, err)
	}
	defer f.Close()
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
			dst = &total
		case "user_usec":
			dst = &user
		case "system_usec":
			dst = &system
		default:
			continue
		}
		us, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, 0, 0, fmt.Errorf("cpu usage of %s: %s: %w", dir, k, err)
		}
		*dst = time.Duration(us) * time.Microsecond
		found++
	}
	if err := sc.Err(); err != nil {
		return 0, 0, 0, fmt.Errorf("cpu usage of %s: %w", dir, err)
	}
	if found != 3 {
		return 0, 0, 0, fmt.Errorf("cpu usage of %s: cpu.stat lacks usage_usec, user_usec or system_usec", dir)
	}
	return total, user, system, nil
}

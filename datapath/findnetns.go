package datapath

import (
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// netnsDirs hold bind-mounted network namespaces (ip netns, CNI runtimes):
// names that stay valid, preferred over /proc/PID/ns/net.
var netnsDirs = []string{"/run/netns", "/var/run/netns"}

// FindNetns looks for a path that names each namespace in cookies: a bind
// mount under /run/netns first, else /proc/PID/ns/net of a process inside
// it. Namespaces not found (no mount, no process: gone) are left out. It
// rebuilds what a lost state file knew about pods the kernel still holds.
func FindNetns(cookies []uint64) map[uint64]string {
	want := map[uint64]bool{}
	for _, c := range cookies {
		want[c] = true
	}
	found := map[uint64]string{}
	seen := map[uint64]bool{} // namespace inodes already looked at
	try := func(path string) {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil || seen[st.Ino] {
			return
		}
		seen[st.Ino] = true
		c, err := NetnsCookie(path)
		if err != nil || !want[c] {
			return
		}
		if _, ok := found[c]; !ok {
			found[c] = path
		}
	}
	for _, dir := range netnsDirs {
		entries, _ := os.ReadDir(dir) // absent on many nodes
		for _, e := range entries {
			try(filepath.Join(dir, e.Name()))
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/ns/net")
	for _, p := range procs {
		if len(found) == len(want) {
			break
		}
		try(p)
	}
	return found
}

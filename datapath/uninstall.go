package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// ErrStillAttached is returned by Uninstall when meshsplice programs stay
// attached to the cgroup after it removed what the pin directory held.
var ErrStillAttached = errors.New("meshsplice programs still attached")

// programPrefix starts the name of every meshsplice BPF program.
const programPrefix = "ms_"

// AttachedProgram is a meshsplice program the kernel runs on a cgroup.
type AttachedProgram struct {
	Hook      string `json:"hook"` // sockops, getsockopt, connect4, connect6
	Program   string `json:"program"`
	ProgramID uint32 `json:"program_id"`
	LinkID    uint32 `json:"link_id,omitempty"` // 0: attached without a link
	// Pins are where that link is pinned on the node's bpffs mounts.
	Pins []string `json:"pins,omitempty"`
}

func (p AttachedProgram) String() string {
	s := fmt.Sprintf("%s %s (program %d", p.Hook, p.Program, p.ProgramID)
	if p.LinkID != 0 {
		s += fmt.Sprintf(", link %d", p.LinkID)
	}
	s += ")"
	if len(p.Pins) > 0 {
		s += " pinned at " + strings.Join(p.Pins, ", ")
	} else {
		s += " pinned nowhere on bpffs"
	}
	return s
}

// UninstallReport is what Uninstall found and removed.
type UninstallReport struct {
	PinDir string
	Cgroup string
	// Removed are the links the pin directory held, as they were before
	// removal (empty when nothing was pinned there).
	Removed []LinkStatus
	// Pinned is true when the pin directory held a datapath.
	Pinned bool
}

// Uninstall removes the datapath pinned at pinDir (see Detach), then asks
// the kernel whether any meshsplice program is still attached to cgroup. If
// one is (the agent used another pin directory, or the pins were removed by
// hand), it returns an error wrapping ErrStillAttached that names each
// program, its link and where that link is pinned, and the command that
// removes it. A pin directory that holds no meshsplice datapath is left
// untouched.
func Uninstall(pinDir, cgroup string, drain time.Duration) (UninstallReport, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	rep := UninstallReport{PinDir: pinDir, Cgroup: cgroup}
	if isDatapathDir(pinDir) {
		rep.Pinned = true
		rep.Removed = inspectLinks(pinDir)
		if err := Detach(pinDir, drain); err != nil {
			return rep, fmt.Errorf("uninstall %s: %w", pinDir, err)
		}
	}
	left, err := CgroupPrograms(cgroup)
	if err != nil {
		return rep, fmt.Errorf("uninstall: %w", err)
	}
	if len(left) == 0 {
		return rep, nil
	}
	var b strings.Builder
	if rep.Pinned {
		fmt.Fprintf(&b, "removed the datapath pinned at %s, but", pinDir)
	} else {
		fmt.Fprintf(&b, "no meshsplice datapath is pinned at %s, and", pinDir)
	}
	fmt.Fprintf(&b, " the kernel still runs meshsplice programs on cgroup %s:", cgroup)
	dirs := map[string]bool{}
	for _, p := range left {
		fmt.Fprintf(&b, "\n  %s", p)
		for _, pin := range p.Pins {
			dirs[pinDirOf(pin)] = true
		}
	}
	if len(dirs) == 0 {
		b.WriteString("\nthey are pinned nowhere on bpffs: a running process holds them (a meshsplice agent?); stop it and they go")
	}
	for _, dir := range sortedKeys(dirs) {
		if entries, _ := os.ReadDir(netnsLinkDir(dir)); len(entries) > 0 {
			fmt.Fprintf(&b, "\n%s also holds %d sk_lookup link(s) of pod network namespaces (%s)", dir, len(entries), netnsLinkDir(dir))
		}
		fmt.Fprintf(&b, "\nremove them with: meshsplice uninstall --pin-dir %s --cgroup %s", dir, cgroup)
	}
	return rep, fmt.Errorf("%w: %s", ErrStillAttached, b.String())
}

// isDatapathDir tells whether dir holds a meshsplice datapath's pins.
func isDatapathDir(dir string) bool {
	for _, p := range []string{mapDir(dir), linkDir(dir), skMsgPin(dir)} {
		if _, err := os.Stat(p); err == nil {
			return true
		}
	}
	return false
}

// pinDirOf is the pin directory of a link pinned at DIR/links/[netns/]NAME.
func pinDirOf(pin string) string {
	dir := filepath.Dir(pin)
	for filepath.Base(dir) != "links" && dir != "/" && dir != "." {
		dir = filepath.Dir(dir)
	}
	return filepath.Dir(dir)
}

// CgroupPrograms lists the meshsplice programs (named ms_*) the kernel runs
// on cgroup, with their links and where those are pinned.
func CgroupPrograms(cgroup string) ([]AttachedProgram, error) {
	f, err := os.Open(cgroup)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat cgroup %s: %w", cgroup, err)
	}
	links := cgroupLinks(st.Ino)
	var pins map[uint32][]string
	var out []AttachedProgram
	for _, p := range cgroupProgs {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: p.attach})
		if err != nil {
			return nil, fmt.Errorf("query %s programs on %s: %w", p.name, cgroup, err)
		}
		for _, ap := range res.Programs {
			name := programName(ap.ID)
			if !strings.HasPrefix(name, programPrefix) {
				continue
			}
			a := AttachedProgram{Hook: p.name, Program: name, ProgramID: uint32(ap.ID)}
			if id, ok := ap.LinkID(); ok {
				a.LinkID = uint32(id)
			} else {
				a.LinkID = links[ap.ID]
			}
			if a.LinkID != 0 {
				if pins == nil {
					pins = pinnedLinks()
				}
				a.Pins = pins[a.LinkID]
			}
			out = append(out, a)
		}
	}
	return out, nil
}

// cgroupLinks maps the programs of the links attached to the cgroup with
// ID cgroupID to their link IDs.
func cgroupLinks(cgroupID uint64) map[ebpf.ProgramID]uint32 {
	out := map[ebpf.ProgramID]uint32{}
	it := new(link.Iterator)
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != cgroupID {
			continue
		}
		out[info.Program] = uint32(info.ID)
	}
	return out
}

func programName(id ebpf.ProgramID) string {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return ""
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return ""
	}
	return info.Name
}

// pinnedLinks finds every link pinned in a "links" directory on the
// node's bpffs mounts (meshsplice's layout), by link ID.
func pinnedLinks() map[uint32][]string {
	out := map[uint32][]string{}
	mounts, _ := cgroups.MountsOfType("bpf")
	for _, mnt := range mounts {
		filepath.WalkDir(mnt, func(path string, e fs.DirEntry, err error) error {
			if err != nil || e.IsDir() || !strings.Contains(path, "/links/") {
				return nil
			}
			l, err := link.LoadPinnedLink(path, nil)
			if err != nil {
				return nil
			}
			defer l.Close()
			if info, err := l.Info(); err == nil {
				out[uint32(info.ID)] = append(out[uint32(info.ID)], path)
			}
			return nil
		})
	}
	return out
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

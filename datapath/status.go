package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/hashicorp/go-multierror"

	"github.com/meshsplice/meshsplice/internal/cgroups"
	"github.com/meshsplice/meshsplice/redirect"
)

// LinkStatus is one pinned link: a program attached to a cgroup or netns.
type LinkStatus struct {
	Name      string `json:"name"` // connect4, ..., netns/<cookie>
	Program   string `json:"program"`
	ProgramID uint32 `json:"program_id"`
	Type      string `json:"type"`
	LinkID    uint32 `json:"link_id"`
	// Target is what the link is attached to: a cgroup directory (or its
	// ID when no directory has it), "netns inode N", or "... gone".
	Target string `json:"target"`
	// Attached is what the kernel says: false for a link whose cgroup or
	// namespace is gone, and when the link could not be read (Error).
	Attached bool `json:"attached"`
	// Error says what could not be read about this pin.
	Error string `json:"error,omitempty"`
}

// Status is what a node's datapath holds, read from its pins only: it
// works without the agent and loads no program.
type Status struct {
	PinDir   string       `json:"pin_dir"`
	Node     NodeSettings `json:"node"`
	Pods     []Pod        `json:"pods"`
	Links    []LinkStatus `json:"links"`
	Counters Counters     `json:"counters"`
	// SplicedSockets is the number of sockets in the splice map now.
	SplicedSockets int `json:"spliced_sockets"`
	// OrigDstEntries is the number of captured connections whose original
	// destination the kernel keeps for SO_ORIGINAL_DST now (one per open
	// captured connection: each is removed when its socket closes).
	OrigDstEntries int `json:"orig_dst_entries"`
	// Pressure lists the kernel tables that are full now and the pressure
	// counters that ever moved (pressure.go).
	Pressure []Pressure `json:"pressure,omitempty"`
	// RecentDenials are the last connections policy denied (at most 64).
	RecentDenials []Denial `json:"recent_denials"`
	// Problems lists what status could not read: the fields they concern
	// are unknown, not false.
	Problems []string `json:"problems,omitempty"`
	// PodKernel is what the kernel holds about each pod of Pods beyond its
	// settings, by netns cookie.
	PodKernel map[uint64]PodKernel `json:"-"`
}

// PodKernel is what the kernel holds about a registered pod beyond its
// settings.
type PodKernel struct {
	// ListenerReady tells whether the sidecar's inbound listener is in
	// ms_listeners (nil: ListenerErr says why it could not be read).
	ListenerReady *bool
	ListenerErr   error
	// Policy is whether the kernel enforces the pod's policy, and why not
	// (ReadPodPolicies); nil with PolicyErr when unreadable.
	Policy    *PodPolicy
	PolicyErr error
}

// Inspect reads the status of the datapath pinned at pinDir. It returns an
// error wrapping ErrNotAttached when nothing is pinned there.
func Inspect(pinDir string) (*Status, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if _, err := os.Stat(mapDir(pinDir)); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w at %s", ErrNotAttached, pinDir)
	}
	maps, err := openPinnedMaps(pinDir,
		redirect.CaptureMapMsPods, redirect.CaptureMapMsPodIps, redirect.CaptureMapMsPorts,
		redirect.CaptureMapMsRanges, redirect.CaptureMapMsNodeSettings,
		redirect.CaptureMapMsCounters, redirect.CaptureMapMsSocks,
		redirect.CaptureMapMsDenialLog, redirect.CaptureMapMsDenialSeq, redirect.CaptureMapMsOrigDst)
	if err != nil {
		return nil, err
	}
	defer closeMaps(maps)
	st := &Status{PinDir: pinDir}
	var node redirect.CaptureMsNode
	if err := maps[redirect.CaptureMapMsNodeSettings].Lookup(uint32(0), &node); err == nil {
		st.Node = NodeSettings{
			Capture:      node.Flags&redirect.CaptureMsNodeFlagMS_NODE_CAPTURE != 0,
			Splice:       node.Flags&redirect.CaptureMsNodeFlagMS_NODE_SPLICE != 0,
			AppSpliceOff: node.Flags&redirect.CaptureMsNodeFlagMS_NODE_NO_APP_SPLICE != 0,
		}
	}
	if st.Pods, err = readPods(maps[redirect.CaptureMapMsPods], maps[redirect.CaptureMapMsPodIps],
		maps[redirect.CaptureMapMsPorts], maps[redirect.CaptureMapMsRanges]); err != nil {
		return nil, err
	}
	if st.Counters, err = readCounters(maps[redirect.CaptureMapMsCounters]); err != nil {
		return nil, err
	}
	var key redirect.CaptureMsSockKey
	var val uint64
	for it := maps[redirect.CaptureMapMsSocks].Iterate(); it.Next(&key, &val); {
		st.SplicedSockets++
	}
	var orig redirect.CaptureMsOrig
	for it := maps[redirect.CaptureMapMsOrigDst].Iterate(); it.Next(&key, &orig); {
		st.OrigDstEntries++
	}
	st.Pressure = append(registryPressure(maps, st.Pods),
		fullPressure(redirect.CaptureMapMsSocks, maps[redirect.CaptureMapMsSocks], st.SplicedSockets)...)
	st.Pressure = append(st.Pressure, fullPressure(redirect.CaptureMapMsOrigDst, maps[redirect.CaptureMapMsOrigDst], st.OrigDstEntries)...)
	st.Pressure = append(st.Pressure, PressureOf(st.Counters)...)
	if st.RecentDenials, err = readDenialLog(maps[redirect.CaptureMapMsDenialLog], maps[redirect.CaptureMapMsDenialSeq]); err != nil {
		return nil, err
	}
	st.PodKernel = inspectPodKernel(pinDir, maps, st.Pods)
	st.Links = inspectLinks(pinDir)
	for _, l := range st.Links {
		if l.Error != "" {
			st.Problems = append(st.Problems, fmt.Sprintf("link %s: %s", l.Name, l.Error))
		}
	}
	return st, nil
}

// inspectPodKernel reads each pod's listener slots and policy sets, with
// the maps Inspect opened and the two it does not need itself.
func inspectPodKernel(pinDir string, maps map[string]*ebpf.Map, pods []Pod) map[uint64]PodKernel {
	out := map[uint64]PodKernel{}
	podsMap := maps[redirect.CaptureMapMsPods]
	var listeners *ebpf.Map
	extra, lerr := openPinnedMaps(pinDir, redirect.CaptureMapMsListeners)
	if lerr == nil {
		defer closeMaps(extra)
		listeners = extra[redirect.CaptureMapMsListeners]
	}
	var policies map[uint64]PodPolicy
	ipInfo, perr := openPinnedMaps(pinDir, redirect.CaptureMapMsIpInfo)
	if perr == nil {
		defer closeMaps(ipInfo)
		policies, perr = podPolicies(podsMap, maps[redirect.CaptureMapMsPodIps],
			ipInfo[redirect.CaptureMapMsIpInfo], maps[redirect.CaptureMapMsNodeSettings])
	}
	for _, p := range pods {
		k := PodKernel{ListenerErr: lerr, PolicyErr: perr}
		var v redirect.CaptureMsPod
		if lerr == nil {
			if err := podsMap.Lookup(&p.Cookie, &v); err != nil {
				k.ListenerErr = fmt.Errorf("pod entry: %w", err)
			} else {
				ready := false
				for _, idx := range []uint32{2 * v.ListenerSlot, 2*v.ListenerSlot + 1} {
					var sockCookie uint64
					if listeners.Lookup(&idx, &sockCookie) == nil {
						ready = true
					}
				}
				k.ListenerReady = &ready
			}
		}
		if perr == nil {
			if pp, ok := policies[p.Cookie]; ok {
				k.Policy = &pp
			} else {
				k.PolicyErr = fmt.Errorf("pod %d is not in the kernel's pod table", p.Cookie)
			}
		}
		out[p.Cookie] = k
	}
	return out
}

func inspectLinks(pinDir string) []LinkStatus {
	var out []LinkStatus
	err := filepath.WalkDir(linkDir(pinDir), func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			out = append(out, LinkStatus{Name: path, Error: err.Error()})
			return nil
		}
		if e.IsDir() {
			return nil
		}
		name, _ := filepath.Rel(linkDir(pinDir), path)
		// Not read-only: the kernel opens a link only read-write (a
		// read-only BPF_OBJ_GET of a link is EINVAL).
		l, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			out = append(out, LinkStatus{Name: name, Error: fmt.Sprintf("open pinned link %s: %v", path, err)})
			return nil
		}
		ls := describeLink(l)
		ls.Name = name
		l.Close()
		out = append(out, ls)
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		out = append(out, LinkStatus{Name: linkDir(pinDir), Error: err.Error()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// describeLink reads what the kernel says about a link: its program and
// what it is attached to. Anything it cannot read is in Error.
func describeLink(l link.Link) LinkStatus {
	var ls LinkStatus
	info, err := l.Info()
	if err != nil {
		ls.Error = fmt.Sprintf("link info: %v", err)
		return ls
	}
	ls.LinkID = uint32(info.ID)
	ls.ProgramID = uint32(info.Program)
	ls.Type = linkTypeName(info.Type)
	ls.Attached = attachedInfo(info)
	switch {
	case info.Cgroup() != nil:
		id := info.Cgroup().CgroupId
		if id == 0 {
			ls.Target = "cgroup gone"
		} else if path, err := cgroups.PathByID(id); err == nil {
			ls.Target = path
		} else {
			ls.Target = fmt.Sprintf("cgroup id %d", id)
		}
	case info.NetNs() != nil:
		if ino := info.NetNs().NetnsInode; ino != 0 {
			ls.Target = fmt.Sprintf("netns inode %d", ino)
		} else {
			ls.Target = "netns gone"
		}
	}
	p, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		ls.Error = fmt.Sprintf("program %d: %v", info.Program, err)
		return ls
	}
	defer p.Close()
	pi, err := p.Info()
	if err != nil {
		ls.Error = fmt.Sprintf("program %d info: %v", info.Program, err)
		return ls
	}
	ls.Program = pi.Name
	return ls
}

func linkTypeName(t link.Type) string {
	switch t {
	case link.CgroupType:
		return "cgroup"
	case link.NetNsType:
		return "netns"
	case link.IterType:
		return "iter"
	case link.RawTracepointType:
		return "raw_tracepoint"
	case link.TracingType:
		return "tracing"
	}
	return fmt.Sprint(t)
}

// attachedInfo: a link whose cgroup or netns died reports a zero target.
func attachedInfo(info *link.Info) bool {
	if c := info.Cgroup(); c != nil {
		return c.CgroupId != 0
	}
	if n := info.NetNs(); n != nil {
		return n.NetnsInode != 0
	}
	return true
}

// Cgroup is the cgroup the programs are attached to, from the links
// ("unknown" when no cgroup link could be read).
func (st *Status) Cgroup() string {
	for _, l := range st.Links {
		if l.Type == "cgroup" && l.Attached && l.Target != "" {
			return l.Target
		}
	}
	return "(unknown: no readable cgroup link)"
}

// openPinnedMaps opens the named maps of the datapath pinned at pinDir,
// read-only. It opens all or none: on error (wrapping ErrNotAttached,
// naming every map it could not open) nothing stays open. Close the maps
// with closeMaps.
func openPinnedMaps(pinDir string, names ...string) (map[string]*ebpf.Map, error) {
	maps := map[string]*ebpf.Map{}
	var result *multierror.Error
	for _, name := range names {
		m, err := ebpf.LoadPinnedMap(filepath.Join(mapDir(pinDir), name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			result = multierror.Append(result, fmt.Errorf("map %s: %w", name, err))
			continue
		}
		maps[name] = m
	}
	if err := result.ErrorOrNil(); err != nil {
		closeMaps(maps)
		return nil, fmt.Errorf("%w: %w", ErrNotAttached, err)
	}
	return maps, nil
}

func closeMaps(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

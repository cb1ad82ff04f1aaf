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

	"github.com/meshsplice/meshsplice/redirect"
)

// LinkStatus is one pinned link: a program attached to a cgroup or netns.
type LinkStatus struct {
	Name      string `json:"name"` // connect4, ..., netns/<cookie>
	Program   string `json:"program"`
	ProgramID uint32 `json:"program_id"`
	Type      string `json:"type"`
	// Attached is false for a pinned link whose cgroup or namespace is gone.
	Attached bool `json:"attached"`
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
	// RecentDenials are the last connections policy denied (at most 64).
	RecentDenials []Denial `json:"recent_denials"`
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
	maps := map[string]*ebpf.Map{}
	var result *multierror.Error
	for _, name := range []string{
		redirect.CaptureMapMsPods, redirect.CaptureMapMsPodIps, redirect.CaptureMapMsPorts,
		redirect.CaptureMapMsRanges, redirect.CaptureMapMsNodeSettings,
		redirect.CaptureMapMsCounters, redirect.CaptureMapMsSocks,
		redirect.CaptureMapMsDenialLog, redirect.CaptureMapMsDenialSeq, redirect.CaptureMapMsOrigDst,
	} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(mapDir(pinDir), name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			result = multierror.Append(result, fmt.Errorf("map %s: %w", name, err))
			continue
		}
		defer m.Close()
		maps[name] = m
	}
	if err := result.ErrorOrNil(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotAttached, err)
	}
	st := &Status{PinDir: pinDir}
	var node redirect.CaptureMsNode
	if err := maps[redirect.CaptureMapMsNodeSettings].Lookup(uint32(0), &node); err == nil {
		st.Node = NodeSettings{
			Capture: node.Flags&redirect.CaptureMsNodeFlagMS_NODE_CAPTURE != 0,
			Splice:  node.Flags&redirect.CaptureMsNodeFlagMS_NODE_SPLICE != 0,
		}
	}
	var err error
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
	if st.RecentDenials, err = readDenialLog(maps[redirect.CaptureMapMsDenialLog], maps[redirect.CaptureMapMsDenialSeq]); err != nil {
		return nil, err
	}
	st.Links = inspectLinks(pinDir)
	return st, nil
}

func inspectLinks(pinDir string) []LinkStatus {
	var out []LinkStatus
	filepath.WalkDir(linkDir(pinDir), func(path string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return nil
		}
		name, _ := filepath.Rel(linkDir(pinDir), path)
		ls := LinkStatus{Name: name}
		if l, err := link.LoadPinnedLink(path, &ebpf.LoadPinOptions{ReadOnly: true}); err == nil {
			if info, err := l.Info(); err == nil {
				ls.ProgramID = uint32(info.Program)
				ls.Type = fmt.Sprint(info.Type)
				ls.Attached = attachedInfo(info)
				if p, err := ebpf.NewProgramFromID(info.Program); err == nil {
					if pi, err := p.Info(); err == nil {
						ls.Program = pi.Name
					}
					p.Close()
				}
			}
			l.Close()
		}
		out = append(out, ls)
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
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

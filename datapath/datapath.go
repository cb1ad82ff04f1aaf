// Package datapath owns meshsplice's kernel side as one unit: it loads the
// capture programs (package redirect) and the splice programs (package
// sockops) so that they share their maps, attaches them with bpf_link, pins
// everything under one bpffs directory so traffic keeps flowing while the
// agent is gone, updates the programs in place on the next start (and
// refuses, changing nothing, pins whose map layout differs from its own:
// ErrIncompatiblePins), keeps the registry of meshed pods, reads the
// counters, and detaches without leftovers.
//
// Layout of the pin directory (default /sys/fs/bpf/meshsplice):
//
//	maps/ms_*            every map, pinned by name (shared by both objects)
//	links/<program>      cgroup links: connect4, connect6, getsockopt, sockops;
//	                     splice(2) reader links: splice-enter, splice-exit,
//	                     splice-guard (BPF LSM) or splice-detect (readers.go)
//	links/netns/<cookie> one sk_lookup link per registered pod namespace
//	sk_msg               the sk_msg program attached to maps/ms_socks
//
// The sk_msg program is attached to the ms_socks map itself (the kernel has
// no pinnable link for it before 6.10); it lives as long as the pinned map.
package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/hashicorp/go-multierror"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/redirect"
	"github.com/meshsplice/meshsplice/sockops"
)

// DefaultPinDir is where a node's datapath is pinned.
const DefaultPinDir = "/sys/fs/bpf/meshsplice"

// ErrNotAttached is returned when no datapath is pinned at the directory.
var ErrNotAttached = errors.New("meshsplice datapath is not attached")

// Options configure Open.
type Options struct {
	// PinDir is the bpffs directory that holds maps and links.
	PinDir string
	// CgroupPath is the cgroup v2 directory the programs attach to. Every
	// process whose sockets meshsplice may touch must live under it; the
	// programs still act only on registered network namespaces. On a node
	// that is the cgroup v2 root; tests use a cgroup of their own.
	CgroupPath string
	// Node holds the node-wide switches, written at every Open.
	Node NodeSettings
	// Logger receives what Open did; nil discards.
	Logger *slog.Logger
	// NoSpliceGuard leaves the BPF LSM guard of splice(2) readers off, as
	// on a kernel without BPF LSM: such readers of spliced sockets are then
	// detected and their connections reset (see Readers). Tests use it.
	NoSpliceGuard bool
	// ListenerResync is how often registered pods are checked for sidecar
	// inbound listeners missing from the kernel (lost events, reuseport
	// groups): 0 means DefaultListenerResync, < 0 never.
	ListenerResync time.Duration
	// MaxEntries sizes maps created now, by name (tests fill small maps);
	// a hash map pinned already keeps its size.
	MaxEntries map[string]uint32
	// RefuseProgram, when set, plays a kernel that cannot load a program:
	// an error for a program name fails it as the kernel would (tests).
	RefuseProgram func(program string) error
}

// Datapath is a loaded, attached and pinned meshsplice datapath.
type Datapath struct {
	mu      sync.Mutex // serialises registry writes
	pinDir  string
	cgroup  string
	log     *slog.Logger
	capture redirect.CaptureObjects
	splice  sockops.SpliceObjects
	links   []link.Link
	netns   map[uint64]string // registered pods' netns paths, by cookie

	teardown     redirect.TeardownObjects
	teardownIter *link.Iter // nil: kernel without bpf_sock_destroy
	polMu        sync.Mutex
	sets         map[uint32]PolicySet // kernel set ID -> set
	newSets      map[uint32]PolicySet // the sets a SetPolicy is writing
	polState     PolicyState
	nextSet      uint32
	denials      []Denial
	denialReader *ringbuf.Reader
	denialsDone  chan struct{}

	readersMode  string
	readersWhy   string
	fionread     ProbeResult // ProbeFionread at Open
	resetIter    *link.Iter
	readerEvents *ringbuf.Reader
	readersDone  chan struct{}

	iterMu    sync.Mutex // one iterator run at a time (ms_iter_netns)
	iter      *link.Iter
	events    *ringbuf.Reader
	watchDone chan struct{}
	// The periodic listener pass, and the listeners (inodes) of pods it
	// could not register, not retried until they change.
	resyncStop, resyncDone chan struct{}
	unregistrable          map[uint64]string
	missing                []*ErrFeatureMissing // optional features this kernel lacks (load.go)
}

type cgroupProg struct {
	name   string
	attach ebpf.AttachType
	prog   func(*Datapath) *ebpf.Program
}

// cgroupProgs are attached in this order: splicing must be ready before
// capture starts sending connections to the sidecar.
var cgroupProgs = []cgroupProg{
	{"sockops", ebpf.AttachCGroupSockOps, func(d *Datapath) *ebpf.Program { return d.splice.MsSockops }},
	{"getsockopt", ebpf.AttachCGroupGetsockopt, func(d *Datapath) *ebpf.Program { return d.capture.MsGetsockopt }},
	{"connect4", ebpf.AttachCGroupInet4Connect, func(d *Datapath) *ebpf.Program { return d.capture.MsConnect4 }},
	{"connect6", ebpf.AttachCGroupInet6Connect, func(d *Datapath) *ebpf.Program { return d.capture.MsConnect6 }},
}

// Open loads the programs, attaches them to opts.CgroupPath and pins them.
// When a datapath is already pinned at opts.PinDir its maps are reused (pods
// and live connections survive) and its links are updated in place with the
// new programs, so no connect goes uncaptured during an upgrade.
func Open(opts Options) (_ *Datapath, err error) {
	if opts.PinDir == "" {
		opts.PinDir = DefaultPinDir
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.CgroupPath == "" {
		return nil, errors.New("open datapath: no cgroup path given")
	}
	if err := checkCgroup2(opts.CgroupPath); err != nil {
		return nil, fmt.Errorf("open datapath: %w", err)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("open datapath: remove memlock limit: %w", err)
	}
	if err := ensureBPFFS(filepath.Dir(opts.PinDir)); err != nil {
		return nil, fmt.Errorf("open datapath: %w", err)
	}
	for _, dir := range []string{mapDir(opts.PinDir), netnsLinkDir(opts.PinDir)} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("open datapath: %w", err)
		}
	}

	d := &Datapath{pinDir: opts.PinDir, cgroup: opts.CgroupPath, log: opts.Logger, netns: map[uint64]string{},
		unregistrable: map[uint64]string{}}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if err := checkPinnedMaps(opts.PinDir, opts); err != nil {
		return nil, fmt.Errorf("open datapath: %w", err)
	}
	load := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: mapDir(opts.PinDir)}}
	if err := d.loadPrograms(load, opts); err != nil {
		return nil, err
	}

	if err := d.SetNode(opts.Node); err != nil {
		return nil, err
	}
	if opts.ListenerResync == 0 {
		opts.ListenerResync = DefaultListenerResync
	}
	if err := d.openListenerWatch(opts.ListenerResync); err != nil {
		return nil, err
	}
	if err := d.openPolicy(load, opts); err != nil {
		return nil, err
	}
	// Before sockops can splice anything: no reader may meet a spliced
	// socket unguarded.
	d.fionread = ProbeFionread()
	if err := d.openReaders(load, !opts.NoSpliceGuard); err != nil {
		return nil, err
	}
	if err := d.attachSkMsg(); err != nil {
		return nil, err
	}
	for _, p := range cgroupProgs {
		l, err := attachCgroup(filepath.Join(linkDir(opts.PinDir), p.name), opts.CgroupPath, p.attach, p.prog(d))
		if err != nil {
			return nil, fmt.Errorf("attach %s to %s: %w", p.name, opts.CgroupPath, err)
		}
		d.links = append(d.links, l)
	}
	// Update the sk_lookup programs of pods registered by an earlier run.
	if err := d.updateNetnsLinks(); err != nil {
		return nil, err
	}
	d.log.Info("datapath attached", "pin_dir", opts.PinDir, "cgroup", opts.CgroupPath)
	return d, nil
}

// PinDir returns the bpffs directory of this datapath.
func (d *Datapath) PinDir() string { return d.pinDir }

// Close releases the Go handles. The datapath stays attached and pinned:
// traffic keeps flowing. Use Detach to remove it.
func (d *Datapath) Close() error {
	var result *multierror.Error
	d.stopListenerWatch()
	if d.events != nil {
		d.events.Close()
		<-d.watchDone
		d.events = nil
	}
	if d.iter != nil {
		d.iter.Close()
		d.iter = nil
	}
	if d.denialReader != nil {
		d.denialReader.Close()
		<-d.denialsDone
		d.denialReader = nil
	}
	if d.teardownIter != nil {
		d.teardownIter.Close()
		d.teardownIter = nil
	}
	d.teardown.Close()
	d.closeReaders()
	for _, l := range d.links {
		if err := l.Close(); err != nil {
			result = multierror.Append(result, err)
		}
	}
	d.links = nil
	if err := d.capture.Close(); err != nil {
		result = multierror.Append(result, err)
	}
	if err := d.splice.Close(); err != nil {
		result = multierror.Append(result, err)
	}
	return result.ErrorOrNil()
}

// attachCgroup attaches prog to the cgroup with a bpf_link pinned at pin. If
// a link is pinned there already it is updated in place; a stale pin (the
// link is gone or defunct) is removed and replaced. A pinned link on another
// cgroup is an error: one pin directory serves one cgroup.
func attachCgroup(pin, cgroup string, attach ebpf.AttachType, prog *ebpf.Program) (link.Link, error) {
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		if want, other, err := linkCgroup(l, cgroup); err == nil && want != other {
			l.Close()
			return nil, fmt.Errorf("%s is attached to another cgroup (id %d, want %d): run uninstall first", pin, other, want)
		}
		if err := l.Update(prog); err == nil {
			return l, nil
		}
		// ENOLINK: the cgroup went away under the link. Start afresh.
		l.Unpin()
		l.Close()
	} else if !errors.Is(err, fs.ErrNotExist) {
		os.Remove(pin)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: attach, Program: prog})
	if err != nil {
		return nil, explainAttach(err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin %s: %w", pin, err)
	}
	return l, nil
}

// Detach removes the datapath pinned at pinDir: links (which detaches the
// programs), the sk_msg attachment and every map. It works without the agent
// that attached them, and it keeps going past errors, reporting them all.
//
// Live spliced connections survive: first every sender is switched to TCP
// (MS_NODE_DRAIN: what was already redirected is read first, then the TCP
// bytes, so streams stay in order); then Detach waits up to drain for the
// splice map to empty, because the kernel drops a socket's queued data if
// the socket leaves a SOCKHASH. After that the sockets go on over plain TCP.
// On 6.18 a live spliced socket never leaves: its psock holds the sk_msg
// program, which holds the map, so the unpinned map and program live on,
// reachable from no pin or hook, until the last such connection closes, and
// bytes queued for a reader that reads only after the drain are still
// delivered in order (e2e TestUninstallDeliversQueuedBytes).
func Detach(pinDir string, drain time.Duration) error {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if _, err := os.Stat(pinDir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var result *multierror.Error
	if m, err := ebpf.LoadPinnedMap(filepath.Join(mapDir(pinDir), "ms_node_settings"), nil); err == nil {
		var node redirect.CaptureMsNode
		if err := m.Lookup(uint32(0), &node); err == nil {
			node.Flags |= redirect.CaptureMsNodeFlagMS_NODE_DRAIN
			if err := m.Update(uint32(0), &node, ebpf.UpdateAny); err != nil {
				result = multierror.Append(result, fmt.Errorf("switch splice to drain: %w", err))
			}
		}
		m.Close()
	}
	// Links next, so no new connection is captured or spliced.
	filepath.WalkDir(linkDir(pinDir), func(path string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return nil
		}
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			if err := l.Unpin(); err != nil {
				result = multierror.Append(result, fmt.Errorf("unpin %s: %w", path, err))
			}
			l.Close()
		} else if err := os.Remove(path); err != nil {
			result = multierror.Append(result, fmt.Errorf("remove %s: %w", path, err))
		}
		return nil
	})
	if m, err := ebpf.LoadPinnedMap(filepath.Join(mapDir(pinDir), "ms_socks"), nil); err == nil {
		waitDrained(m, drain)
		if err := detachSkMsg(pinDir, m); err != nil {
			result = multierror.Append(result, err)
		}
		m.Close()
	}
	os.Remove(skMsgPin(pinDir))
	entries, _ := os.ReadDir(mapDir(pinDir))
	for _, e := range entries {
		if err := os.Remove(filepath.Join(mapDir(pinDir), e.Name())); err != nil {
			result = multierror.Append(result, err)
		}
	}
	for _, dir := range []string{netnsLinkDir(pinDir), linkDir(pinDir), mapDir(pinDir), pinDir} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			result = multierror.Append(result, err)
		}
	}
	return result.ErrorOrNil()
}

// waitDrained gives receivers time to read redirected data still queued on
// spliced sockets; it returns when ms_socks is empty or at the deadline.
func waitDrained(m *ebpf.Map, drain time.Duration) {
	deadline := time.Now().Add(drain)
	for time.Now().Before(deadline) {
		var key redirect.CaptureMsSockKey
		var cookie uint64
		it := m.Iterate()
		if !it.Next(&key, &cookie) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// detachSkMsg removes the pinned sk_msg program from the map. Without this
// the map and the program keep each other alive after every pin is gone.
func detachSkMsg(pinDir string, m *ebpf.Map) error {
	prog, err := ebpf.LoadPinnedProgram(skMsgPin(pinDir), nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load pinned sk_msg: %w", err)
	}
	defer prog.Close()
	err = link.RawDetachProgram(link.RawDetachProgramOptions{
		Target: m.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict,
	})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("detach sk_msg from ms_socks: %w", err)
	}
	return nil
}

func skMsgPin(pinDir string) string { return filepath.Join(pinDir, "sk_msg") }

// linkCgroup returns the ID of cgroup and of the cgroup l is attached to
// (the cgroup v2 ID is its directory's inode number).
func linkCgroup(l link.Link, cgroup string) (want, got uint64, err error) {
	var st unix.Stat_t
	if err := unix.Stat(cgroup, &st); err != nil {
		return 0, 0, err
	}
	info, err := l.Info()
	if err != nil {
		return 0, 0, err
	}
	ci := info.Cgroup()
	if ci == nil {
		return 0, 0, errors.New("not a cgroup link")
	}
	return st.Ino, ci.CgroupId, nil
}

func mapDir(pinDir string) string       { return filepath.Join(pinDir, "maps") }
func linkDir(pinDir string) string      { return filepath.Join(pinDir, "links") }
func netnsLinkDir(pinDir string) string { return filepath.Join(pinDir, "links", "netns") }

// ensureBPFFS mounts bpffs at dir when nothing is mounted there.
func ensureBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	return nil
}

func checkCgroup2(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup v2 directory (find the cgroup2 mount in /proc/self/mountinfo)", path)
	}
	return nil
}

// explainLoad makes a verifier or feature error readable.
func explainLoad(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%w\n%+v", err, ve)
	}
	var fm *ErrFeatureMissing
	if errors.Is(err, ebpf.ErrNotSupported) && !errors.As(err, &fm) {
		return fmt.Errorf("%w (meshsplice needs Linux >= 6.1 with BPF, BTF, sockmap and sk_lookup)", err)
	}
	return err
}

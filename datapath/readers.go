package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/sockops"
)

// A spliced socket's incoming data waits in its psock queue, which splice(2)
// and sendfile(2) do not read (bpf/readers.c). What a node does about such
// readers:
const (
	// ReadersGuarded: BPF LSM is active; splice-style reads of a spliced
	// socket fail with EINVAL and callers fall back to read(2), in order.
	ReadersGuarded = "guarded"
	// ReadersDetected: no BPF LSM; the first splice-style read of a
	// spliced socket is counted and logged, the pod's new connections stay
	// TCP, and that connection is reset instead of hanging.
	ReadersDetected = "detected"
	// ReadersUnprotected: this kernel cannot load even the detector.
	ReadersUnprotected = "unprotected"
)

// ErrNoBPFLSM says that "bpf" is not among the kernel's active LSMs.
var ErrNoBPFLSM = errors.New(`BPF LSM is not active ("bpf" missing from the kernel's lsm= list; CONFIG_BPF_LSM=y and lsm=...,bpf turn it on)`)

// BPFLSMActive reports whether the kernel runs BPF LSM programs: "bpf" in
// securityfs' lsm file. securityfs is mounted on a private directory when
// the usual one is not mounted, and unmounted again.
func BPFLSMActive() (bool, error) {
	b, err := os.ReadFile("/sys/kernel/security/lsm")
	if err != nil {
		dir, terr := os.MkdirTemp("", "meshsplice-securityfs-")
		if terr != nil {
			return false, fmt.Errorf("read lsm list: %w", err)
		}
		defer os.Remove(dir)
		if merr := unix.Mount("securityfs", dir, "securityfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); merr != nil {
			return false, fmt.Errorf("read lsm list: %w (mount securityfs: %w)", err, merr)
		}
		defer unix.Unmount(dir, unix.MNT_DETACH)
		if b, err = os.ReadFile(filepath.Join(dir, "lsm")); err != nil {
			return false, fmt.Errorf("read lsm list: %w", err)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), ",") {
		if l == "bpf" {
			return true, nil
		}
	}
	return false, nil
}

// readerGuard and readerDetector are the two halves of bpf/readers.c,
// loaded apart: the guard's trampoline programs do not load on every kernel.
type readerGuard struct {
	Enter *ebpf.Program `ebpf:"ms_splice_enter"`
	Exit  *ebpf.Program `ebpf:"ms_splice_exit"`
	Guard *ebpf.Program `ebpf:"ms_splice_guard"`
}

type readerDetector struct {
	Detect *ebpf.Program `ebpf:"ms_splice_detect"`
	Reset  *ebpf.Program `ebpf:"ms_reset_iter"`
	Events *ebpf.Map     `ebpf:"ms_reader_events"`
}

// readerLinks are the pins of the reader programs under links/.
var readerLinks = []string{"splice-enter", "splice-exit", "splice-guard", "splice-detect"}

func closeAll(cs ...interface{ Close() error }) {
	for _, c := range cs {
		c.Close() // nil programs and maps close fine
	}
}

// loadGuard loads and attaches the guard; on failure nothing stays.
func (d *Datapath) loadGuard(spec *ebpf.CollectionSpec, load *ebpf.CollectionOptions) ([]link.Link, error) {
	var g readerGuard
	if err := spec.LoadAndAssign(&g, load); err != nil {
		return nil, err
	}
	defer closeAll(g.Enter, g.Exit, g.Guard)
	var links []link.Link
	for _, a := range []struct {
		pin    string
		prog   *ebpf.Program
		attach func(*ebpf.Program) (link.Link, error)
	}{{"splice-enter", g.Enter, tracing}, {"splice-exit", g.Exit, tracing}, {"splice-guard", g.Guard, lsm}} {
		l, err := attachPinned(filepath.Join(linkDir(d.pinDir), a.pin), a.prog, a.attach)
		if err != nil {
			for _, l := range links {
				l.Unpin()
				l.Close()
			}
			return nil, fmt.Errorf("attach %s: %w", a.pin, err)
		}
		links = append(links, l)
	}
	return links, nil
}

func tracing(p *ebpf.Program) (link.Link, error) {
	return link.AttachTracing(link.TracingOptions{Program: p})
}

func lsm(p *ebpf.Program) (link.Link, error) {
	return link.AttachLSM(link.LSMOptions{Program: p})
}

// openReaders loads bpf/readers.c: the guard where BPF LSM is active and
// its programs load (unless guard is false), the detector everywhere else,
// and follows the detector's events. A kernel that can load neither keeps
// everything else; Readers() then says splice(2) readers are unprotected.
func (d *Datapath) openReaders(load *ebpf.CollectionOptions, guard bool) error {
	d.readersMode = ReadersUnprotected
	spec, err := loadSpec(sockops.LoadReaders)
	if err != nil {
		return fmt.Errorf("load reader programs: %w", err)
	}
	keep := map[string]bool{}
	if guard {
		active, err := BPFLSMActive()
		switch {
		case err != nil:
			d.readersWhy = fmt.Sprintf("cannot tell whether BPF LSM is active: %v", err)
		case !active:
			d.readersWhy = ErrNoBPFLSM.Error()
		default:
			links, err := d.loadGuard(spec, load)
			if err != nil {
				d.readersWhy = fmt.Sprintf("the BPF LSM guard does not load on this kernel: %v", err)
				break
			}
			d.links = append(d.links, links...)
			for _, n := range readerLinks[:3] {
				keep[n] = true
			}
			d.readersMode = ReadersGuarded
		}
	} else {
		d.readersWhy = "guard turned off"
	}
	if d.readersMode != ReadersGuarded {
		var det readerDetector
		if err := spec.LoadAndAssign(&det, load); err != nil {
			d.readersWhy += fmt.Sprintf("; the detector does not load either: %v", explainLoad(err))
		} else if l, err := attachPinned(filepath.Join(linkDir(d.pinDir), "splice-detect"), det.Detect, tracing); err != nil {
			d.readersWhy += fmt.Sprintf("; the detector does not attach: %v", err)
			closeAll(det.Detect, det.Reset, det.Events)
		} else {
			d.links = append(d.links, l)
			keep["splice-detect"] = true
			det.Detect.Close()
			d.readersMode = ReadersDetected
			d.startReaderWatch(det)
		}
	}
	d.removeReaderLinks(keep)
	lvl := slog.LevelInfo
	if d.readersMode != ReadersGuarded {
		lvl = slog.LevelWarn
	}
	d.log.Log(context.Background(), lvl, "splice(2) readers of spliced sockets", "mode", d.readersMode, "why", d.readersWhy)
	return nil
}

// startReaderWatch follows the detector's events and keeps its reset
// iterator.
func (d *Datapath) startReaderWatch(det readerDetector) {
	defer det.Reset.Close()
	defer det.Events.Close()
	if it, err := link.AttachIter(link.IterOptions{Program: det.Reset}); err != nil {
		d.log.Warn("connections of unguarded splice(2) readers will not be reset", "error", err)
	} else {
		d.resetIter = it
	}
	rd, err := ringbuf.NewReader(det.Events)
	if err != nil {
		d.log.Warn("splice(2) reader events cannot be read", "error", err)
		return
	}
	d.readerEvents = rd
	d.readersDone = make(chan struct{})
	go d.watchReaders(rd)
}

// removeReaderLinks unpins the reader links an earlier run left that this
// one does not use (the guard, when BPF LSM went away or is turned off).
func (d *Datapath) removeReaderLinks(keep map[string]bool) {
	for _, name := range readerLinks {
		if keep[name] {
			continue
		}
		pin := filepath.Join(linkDir(d.pinDir), name)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			l.Unpin()
			l.Close()
		}
	}
}

// attachPinned attaches prog with a link pinned at pin, replacing a link an
// earlier run pinned there. Tracing links cannot be updated in place: the
// new one is attached before the old one goes, so there is no gap (both
// programs give the same verdict meanwhile).
func attachPinned(pin string, prog *ebpf.Program, attach func(*ebpf.Program) (link.Link, error)) (link.Link, error) {
	l, err := attach(prog)
	if err != nil {
		return nil, err
	}
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		old.Unpin()
		old.Close()
	} else if !errors.Is(err, fs.ErrNotExist) {
		os.Remove(pin)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin %s: %w", pin, err)
	}
	return l, nil
}

// Readers says what this datapath does about splice(2) readers of spliced
// sockets: ReadersGuarded, ReadersDetected or ReadersUnprotected, and why
// not guarded.
func (d *Datapath) Readers() (mode, why string) { return d.readersMode, d.readersWhy }

// SpliceReaderPods returns the pods (netns cookies) where the detector saw
// an unguarded splice(2) read of a spliced socket, with how many: their new
// connections are not spliced.
func (d *Datapath) SpliceReaderPods() (map[uint64]uint64, error) {
	out := map[uint64]uint64{}
	var cookie, n uint64
	it := d.splice.MsSpliceReaders.Iterate()
	for it.Next(&cookie, &n) {
		out[cookie] = n
	}
	return out, it.Err()
}

// watchReaders follows ms_reader_events until the reader is closed: it logs
// the pod and the process, and resets the stuck connection.
func (d *Datapath) watchReaders(rd *ringbuf.Reader) {
	defer close(d.readersDone)
	for {
		rec, err := rd.Read()
		if errors.Is(err, os.ErrClosed) {
			return
		}
		if err != nil {
			d.log.Warn("read splice reader events", "error", err)
			continue
		}
		var ev sockops.ReadersMsReaderEvent
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
			continue
		}
		comm := make([]byte, 0, len(ev.Comm))
		for _, c := range ev.Comm {
			if c == 0 {
				break
			}
			comm = append(comm, byte(c))
		}
		d.mu.Lock()
		path, ok := d.netns[ev.Netns]
		d.mu.Unlock()
		d.log.Warn("a process read a spliced socket with splice(2) and no BPF LSM guard refused it: its pod's new connections are not spliced, and the connection is reset",
			"netns_cookie", ev.Netns, "netns", path, "pid", ev.Pid, "tid", ev.Tid, "comm", string(comm))
		if !ok || d.resetIter == nil {
			d.log.Error("cannot reset the splice(2) reader's connection: it may hang", "netns_cookie", ev.Netns)
			continue
		}
		if err := d.runIterIn(ev.Netns, path, d.resetIter); err != nil {
			d.log.Error("reset the splice(2) reader's connection", "netns", path, "error", err)
		}
	}
}

// closeReaders releases the Go handles of the reader programs.
func (d *Datapath) closeReaders() {
	if d.readerEvents != nil {
		d.readerEvents.Close()
		<-d.readersDone
		d.readerEvents = nil
	}
	if d.resetIter != nil {
		d.resetIter.Close()
		d.resetIter = nil
	}
}

// ProbeReaders says which protection against hung splice(2) readers this
// kernel gives spliced sockets, by loading the programs (unpinned,
// unattached) as Open would: the guard needs BPF LSM active and trampoline
// programs; the detector needs the raw sys_enter tracepoint.
func ProbeReaders() ProbeResult {
	r := ProbeResult{Name: "splice(2) readers of spliced sockets"}
	spec, err := sockops.LoadReaders()
	if err != nil {
		r.Detail = err.Error()
		return r
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	why := ""
	active, err := BPFLSMActive()
	switch {
	case err != nil:
		why = fmt.Sprintf("cannot tell whether BPF LSM is active: %v", err)
	case !active:
		why = ErrNoBPFLSM.Error()
	default:
		var g readerGuard
		if err := spec.LoadAndAssign(&g, nil); err != nil {
			why = fmt.Sprintf("BPF LSM is active but its programs do not load: %v", err)
			break
		}
		closeAll(g.Enter, g.Exit, g.Guard)
		r.OK = true
		r.Name += ": " + ReadersGuarded
		r.Detail = "their splice(2)/sendfile(2) reads fail with EINVAL and they fall back to read(2), in order; app <-> sidecar splicing is safe"
		return r
	}
	var det readerDetector
	if err := spec.LoadAndAssign(&det, nil); err != nil {
		r.Name += ": " + ReadersUnprotected
		r.Detail = fmt.Sprintf("%s; the detector does not load either (%v): such a reader hangs", why, err)
		return r
	}
	closeAll(det.Detect, det.Reset, det.Events)
	r.OK = true
	r.Name += ": " + ReadersDetected
	r.Detail = why + "; the first splice(2)/sendfile(2) read of a spliced socket resets that connection and its pod stays TCP from then on (io_uring splice is not seen); keep app <-> sidecar splicing opt-in"
	return r
}

// Readers says, from the pinned links, what the datapath does about
// splice(2) readers of spliced sockets: ReadersGuarded, ReadersDetected or
// ReadersUnprotected (`meshsplice check` says why).
func (st *Status) Readers() string {
	mode := ReadersUnprotected
	for _, l := range st.Links {
		switch {
		case l.Name == "splice-guard" && l.Attached:
			return ReadersGuarded
		case l.Name == "splice-detect" && l.Attached:
			mode = ReadersDetected
		}
	}
	return mode
}

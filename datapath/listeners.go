package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/hashicorp/go-multierror"

	"github.com/meshsplice/meshsplice/redirect"
)

// Inbound capture hands connections to the sidecar's inbound listener, which
// sk_lookup finds in the ms_listeners sockmap. Putting it there takes the
// agent: sockops sees listen() but may not insert a listening socket into a
// sockmap (EOPNOTSUPP on 6.18), so it sends the pod's netns cookie on the
// ms_events ring buffer and the agent runs the ms_listener_iter iterator in
// that namespace, which inserts it. AddPod does the same for a sidecar that
// was listening before the pod was registered. Until the listener is in the
// map, inbound connections to the pod are refused, as with a sidecar that is
// not up yet.
//
// An event can be lost (ms_events full: counted as
// sockops.listener_event_lost) and a listener can be missing from the map
// with no event at all: a sidecar with several SO_REUSEPORT listeners (one
// per worker) has one of them in its slot, and when that one closes the
// others still listen. So a periodic pass (ResyncListeners) looks, in every
// registered pod, for listeners on the inbound port that are not in
// ms_listeners, registers them and counts it (agent.listener_resynced).

// watchListeners follows ms_events until the reader is closed.
func (d *Datapath) watchListeners(rd *ringbuf.Reader) {
	defer close(d.watchDone)
	for {
		rec, err := rd.Read()
		if errors.Is(err, os.ErrClosed) {
			return
		}
		if err != nil {
			d.log.Warn("read listener events", "error", err)
			continue
		}
		if len(rec.RawSample) < 8 {
			continue
		}
		cookie := uint64(0)
		for i := 7; i >= 0; i-- {
			cookie = cookie<<8 | uint64(rec.RawSample[i])
		}
		// Under d.mu: RemovePod must not free the pod's slot while the
		// iterator fills it.
		d.mu.Lock()
		path, ok := d.netns[cookie]
		if ok {
			err = d.syncListeners(cookie, path)
		}
		d.mu.Unlock()
		if !ok {
			// Not registered with this agent (yet): AddPod runs the
			// iterator itself once the pod is registered.
			d.log.Debug("sidecar listener in a pod whose netns path is unknown", "netns_cookie", cookie)
		} else if err != nil {
			d.log.Error("register sidecar listener; retried by the next listener pass", "netns", path, "error", err)
		}
	}
}

// DefaultListenerResync is how often the datapath looks for sidecar inbound
// listeners missing from ms_listeners (Options.ListenerResync).
const DefaultListenerResync = 5 * time.Second

// resyncLoop runs ResyncListeners every interval until stop is closed.
func (d *Datapath) resyncLoop(interval time.Duration, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		if _, err := d.ResyncListeners(); err != nil {
			d.log.Warn("listener pass", "error", err)
		}
	}
}

// ResyncListeners finds, in the namespace of every pod registered with this
// datapath, listeners on the pod's inbound port that are missing from
// ms_listeners (lost event, closed member of a reuseport group), registers
// them, counts each (agent.listener_resynced) and returns how many pods it
// fixed. A listener the sockmap refuses (MPTCP) is tried again only when
// the pod's listeners change.
func (d *Datapath) ResyncListeners() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var result *multierror.Error
	fixed := 0
	for cookie, path := range d.netns {
		var pod redirect.CaptureMsPod
		if err := d.capture.MsPods.Lookup(&cookie, &pod); err != nil {
			continue
		}
		missing, seen, err := d.missingListeners(cookie, path, pod)
		if err != nil {
			result = multierror.Append(result, fmt.Errorf("pod %d: %w", cookie, err))
			continue
		}
		if !missing || d.unregistrable[cookie] == seen {
			continue
		}
		if err := d.syncListeners(cookie, path); err != nil {
			result = multierror.Append(result, fmt.Errorf("pod %d: %w", cookie, err))
			continue
		}
		if still, _, err := d.missingListeners(cookie, path, pod); err != nil || still {
			// Refused by the sockmap (counted by the iterator).
			d.unregistrable[cookie] = seen
			continue
		}
		delete(d.unregistrable, cookie)
		fixed++
		d.log.Warn("sidecar inbound listener was missing from ms_listeners; registered", "netns", path, "netns_cookie", cookie)
		if err := d.bumpCounter(redirect.CaptureMsCounterMS_C_LISTENER_RESYNCED); err != nil {
			result = multierror.Append(result, err)
		}
	}
	return fixed, result.ErrorOrNil()
}

// missingListeners reports whether the pod's namespace has a listener on
// the inbound port of a family whose ms_listeners entry is empty (a closed
// listener leaves the map by itself, so a filled entry is a live one), and
// the inodes of the listeners seen.
func (d *Datapath) missingListeners(cookie uint64, path string, pod redirect.CaptureMsPod) (bool, string, error) {
	var families [2]bool // [0] IPv4, [1] IPv6
	var seen []string
	err := doInPod(cookie, path, func() error {
		for i, file := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
			inodes, err := tcpListeners(file, pod.InboundPort)
			if err != nil {
				return err
			}
			families[i] = len(inodes) > 0
			seen = append(seen, inodes...)
		}
		return nil
	})
	if err != nil {
		return false, "", err
	}
	for i, listening := range families {
		idx := 2*pod.ListenerSlot + uint32(i)
		var sockCookie uint64
		if listening && d.capture.MsListeners.Lookup(&idx, &sockCookie) != nil {
			return true, strings.Join(seen, ","), nil
		}
	}
	return false, strings.Join(seen, ","), nil
}

// tcpListeners returns the socket inodes of the listeners on port in a
// /proc/net/tcp{,6} table (of the namespace of the reading thread).
func tcpListeners(file string, port uint16) ([]string, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	want := fmt.Sprintf(":%04X", port)
	var inodes []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "0A" || !strings.HasSuffix(fields[1], want) {
			continue
		}
		inodes = append(inodes, fields[9])
	}
	return inodes, sc.Err()
}

// bumpCounter adds one to a counter the agent keeps in ms_counters (the
// programs never write it, so the read-modify-write races nothing).
func (d *Datapath) bumpCounter(c Counter) error {
	var perCPU []uint64
	if err := d.capture.MsCounters.Lookup(uint32(c), &perCPU); err != nil {
		return fmt.Errorf("read counter %s: %w", CounterName(c), err)
	}
	perCPU[0]++
	if err := d.capture.MsCounters.Update(uint32(c), perCPU, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("count %s: %w", CounterName(c), err)
	}
	return nil
}

// syncListeners runs the listener iterator inside the pod's netns at path.
// Called with d.mu held.
func (d *Datapath) syncListeners(cookie uint64, path string) error {
	return d.runIterIn(cookie, path, d.iter)
}

// openListenerWatch attaches the iterator, starts following ms_events and,
// every interval (if > 0), the listener pass.
func (d *Datapath) openListenerWatch(interval time.Duration) error {
	it, err := link.AttachIter(link.IterOptions{Program: d.capture.MsListenerIter})
	if err != nil {
		return fmt.Errorf("attach listener iterator: %w", err)
	}
	d.iter = it
	rd, err := ringbuf.NewReader(d.splice.MsEvents)
	if err != nil {
		return fmt.Errorf("read ms_events: %w", err)
	}
	d.events = rd
	d.watchDone = make(chan struct{})
	go d.watchListeners(rd)
	if interval > 0 {
		d.resyncStop, d.resyncDone = make(chan struct{}), make(chan struct{})
		go d.resyncLoop(interval, d.resyncStop, d.resyncDone)
	}
	return nil
}

// stopListenerWatch stops the periodic listener pass (Close).
func (d *Datapath) stopListenerWatch() {
	if d.resyncStop != nil {
		close(d.resyncStop)
		<-d.resyncDone
		d.resyncStop = nil
	}
}

// ListenerReady reports whether the pod's sidecar inbound listener is in
// the kernel's table, i.e. inbound capture can hand it connections.
func (d *Datapath) ListenerReady(cookie uint64) (bool, error) {
	var pod redirect.CaptureMsPod
	if err := d.capture.MsPods.Lookup(&cookie, &pod); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return false, ErrUnknownPod
		}
		return false, err
	}
	for _, idx := range []uint32{2 * pod.ListenerSlot, 2*pod.ListenerSlot + 1} {
		var sockCookie uint64
		if err := d.capture.MsListeners.Lookup(&idx, &sockCookie); err == nil {
			return true, nil
		}
	}
	return false, nil
}

// WaitListener waits until ListenerReady or the timeout.
func (d *Datapath) WaitListener(cookie uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := d.ListenerReady(cookie)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("sidecar inbound listener of pod %d not registered after %v", cookie, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

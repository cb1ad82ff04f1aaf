package datapath

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"

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
		d.mu.Lock()
		path, ok := d.netns[cookie]
		d.mu.Unlock()
		if !ok {
			d.log.Warn("sidecar listener in a pod whose netns path is unknown; inbound capture waits for the pod's next registration", "netns_cookie", cookie)
			continue
		}
		if err := d.syncListeners(cookie, path); err != nil {
			d.log.Error("register sidecar listener", "netns", path, "error", err)
		}
	}
}

// syncListeners runs the listener iterator inside the pod's netns at path.
func (d *Datapath) syncListeners(cookie uint64, path string) error {
	return d.runIterIn(cookie, path, d.iter)
}

// openListenerWatch attaches the iterator and starts following ms_events.
func (d *Datapath) openListenerWatch() error {
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
	return nil
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

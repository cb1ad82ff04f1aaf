package agent

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/meshsplice/meshsplice/datapath"
)

// KubeEvents is the agent's EventSink on Kubernetes: every failure to
// apply something for a pod, and every drift found in a pod's kernel
// state, becomes a Warning Event on the pod (`kubectl describe pod`
// shows it); a failure that concerns no pod (the policy as a whole, the
// node switches, a state file) goes on the Node. client-go's recorder
// aggregates similar Events and rate-limits each object (a burst of 25,
// then one per 5 minutes), so a failure retried with back-off does not
// flood the API server.
//
// Failure never blocks (the agent calls it holding its lock): Events are
// queued, and a full queue drops them, counted in the log.
type KubeEvents struct {
	client      kubernetes.Interface
	node        string
	log         *slog.Logger
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
	queue       chan failureEvent
	done        chan struct{}

	mu      sync.Mutex
	stopped bool
	uids    map[string]cachedUID
	dropped int
}

type failureEvent struct {
	what, object, message string
}

type cachedUID struct {
	uid  types.UID
	when time.Time
}

// Event reasons, by what failed.
const (
	ReasonMapFull          = "MapFull"          // a kernel table is full
	ReasonProgramFailed    = "ProgramFailed"    // the pod's settings could not be written
	ReasonPolicyNotApplied = "PolicyNotApplied" // the policy was rolled back: the previous one is in force
	ReasonKernelDrift      = "KernelDrift"      // the kernel does not hold what the config says
)

// eventQueue bounds the Events waiting for the API server.
const eventQueue = 256

// NewKubeEvents starts writing Events with client, as the agent of node.
// Shutdown flushes and stops it.
func NewKubeEvents(client kubernetes.Interface, node string, log *slog.Logger) *KubeEvents {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	k := &KubeEvents{client: client, node: node, log: log, broadcaster: b,
		recorder: b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "meshsplice-agent", Host: node}),
		queue:    make(chan failureEvent, eventQueue), done: make(chan struct{}), uids: map[string]cachedUID{}}
	go k.run()
	return k
}

// Failure implements EventSink.
func (k *KubeEvents) Failure(what, object string, err error) {
	msg := err.Error()
	if len(msg) > 1000 {
		msg = msg[:1000] + "..."
	}
	r := reason(what, err)
	if r == ReasonMapFull {
		msg = "a kernel table is full (node limits: see the README); the last good state stays in force: " + msg
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stopped {
		return // the agent is stopping: its last failures go to the log only
	}
	select {
	case k.queue <- failureEvent{what: r, object: object, message: msg}:
	default:
		k.dropped++
		k.log.Warn("kubernetes event dropped: too many waiting", "reason", r, "object", object, "dropped", k.dropped)
	}
}

// Shutdown writes the queued Events and stops; later failures are not
// sent.
func (k *KubeEvents) Shutdown() {
	k.mu.Lock()
	if k.stopped {
		k.mu.Unlock()
		return
	}
	k.stopped = true
	close(k.queue)
	k.mu.Unlock()
	<-k.done
	k.broadcaster.Shutdown()
}

func (k *KubeEvents) run() {
	defer close(k.done)
	for ev := range k.queue {
		k.recorder.Event(k.reference(ev.object), corev1.EventTypeWarning, ev.what, ev.message)
	}
}

// reference is the object an Event goes on: the pod "namespace/name", or
// the node.
func (k *KubeEvents) reference(object string) *corev1.ObjectReference {
	ns, name, ok := strings.Cut(object, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: k.node, UID: types.UID(k.node)}
	}
	return &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: ns, Name: name, UID: k.podUID(ns, name)}
}

// podUID finds a pod's UID (kubectl describe matches Events by it),
// cached for a minute; "" when the pod cannot be read.
func (k *KubeEvents) podUID(ns, name string) types.UID {
	key := ns + "/" + name
	k.mu.Lock()
	c, ok := k.uids[key]
	k.mu.Unlock()
	if ok && time.Since(c.when) < time.Minute {
		return c.uid
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := k.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		k.log.Debug("pod of an event not found; the event names it without its UID", "pod", key, "error", err)
		return ""
	}
	k.mu.Lock()
	if len(k.uids) > 4096 {
		clear(k.uids)
	}
	k.uids[key] = cachedUID{p.UID, time.Now()}
	k.mu.Unlock()
	return p.UID
}

// reason is an Event's reason for a failure of kind what.
func reason(what string, err error) string {
	switch {
	case what == "policy":
		return ReasonPolicyNotApplied // the message says when a map is full
	case what == "drift":
		return ReasonKernelDrift
	case errors.Is(err, unix.E2BIG) || errors.Is(err, datapath.ErrPolicyMapFull):
		return ReasonMapFull
	case what == "program_pod":
		return ReasonProgramFailed
	}
	// save_state -> SaveStateFailed
	var b strings.Builder
	for _, w := range strings.Split(what, "_") {
		if w != "" {
			b.WriteString(strings.ToUpper(w[:1]) + w[1:])
		}
	}
	return b.String() + "Failed"
}

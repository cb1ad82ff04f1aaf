package agent

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshsplice/meshsplice/datapath"
)

// TestEventReasons: each failure kind gets the reason an operator can
// filter on; a full kernel table says so whatever failed.
func TestEventReasons(t *testing.T) {
	for _, c := range []struct {
		what string
		err  error
		want string
	}{
		{"program_pod", errors.New("netns gone"), ReasonProgramFailed},
		{"program_pod", fmt.Errorf("add pod 7: update: %w", unix.E2BIG), ReasonMapFull},
		{"policy", fmt.Errorf("%w: %w", datapath.ErrPolicyNotApplied, datapath.ErrPolicyMapFull), ReasonPolicyNotApplied},
		{"drift", errors.New("excludeInboundPorts"), ReasonKernelDrift},
		{"save_state", errors.New("disk full"), "SaveStateFailed"},
		{"remove_passthrough_v6", errors.New("x"), "RemovePassthroughV6Failed"},
	} {
		if got := reason(c.what, c.err); got != c.want {
			t.Errorf("reason(%s, %v) = %s, want %s", c.what, c.err, got, c.want)
		}
	}
}

// TestEventObject: a pod's failure goes on the pod, anything else on the
// node.
func TestEventObject(t *testing.T) {
	k := &KubeEvents{node: "node-a"}
	for _, c := range []struct{ object, kind, ns, name string }{
		{"", "Node", "", "node-a"},
		{"web", "Node", "", "node-a"},
		{"container abc", "Node", "", "node-a"},
		{"netns cookie 9", "Node", "", "node-a"},
	} {
		ref := k.reference(c.object)
		if ref.Kind != c.kind || ref.Namespace != c.ns || ref.Name != c.name {
			t.Errorf("%q: %s %s/%s, want %s %s/%s", c.object, ref.Kind, ref.Namespace, ref.Name, c.kind, c.ns, c.name)
		}
	}
}

// TestKubeEventsOnThePod: a pod's failure becomes a Warning Event on the
// pod, with its UID; a failure after Shutdown is dropped, not a panic.
func TestKubeEventsOnThePod(t *testing.T) {
	c := fake.NewClientset(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", UID: "uid-web"}})
	k := NewKubeEvents(c, "node-a", nil)
	k.Failure("program_pod", "shop/web", fmt.Errorf("add pod 7: %w", unix.E2BIG))
	deadline := time.Now().Add(10 * time.Second)
	var got []corev1.Event
	for len(got) == 0 && time.Now().Before(deadline) {
		list, err := c.CoreV1().Events("shop").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got = list.Items
		time.Sleep(20 * time.Millisecond)
	}
	k.Shutdown()
	k.Failure("program_pod", "shop/web", errors.New("after shutdown"))
	if len(got) != 1 {
		t.Fatalf("events %+v, want one", got)
	}
	e := got[0]
	if e.Reason != ReasonMapFull || e.Type != corev1.EventTypeWarning || e.InvolvedObject.Kind != "Pod" ||
		e.InvolvedObject.Name != "web" || e.InvolvedObject.UID != "uid-web" || e.Source.Host != "node-a" {
		t.Errorf("event %+v", e)
	}
}

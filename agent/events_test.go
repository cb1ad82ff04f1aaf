package agent

import (
	"errors"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"

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

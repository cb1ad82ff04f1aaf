package datapath

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Other programs on meshsplice's cgroup hooks (a socket load balancer's
// connect4/6, another sockops) compose with meshsplice's when they are
// attached with a bpf_link or BPF_F_ALLOW_MULTI: every program of the
// hook runs, those of the socket's own cgroup first, then those of its
// parents, and within one cgroup in the order they were attached. A
// program attached with no flags is exclusive: the kernel then refuses
// any other program on that cgroup and below it (EPERM).

// explainAttach says why attaching a cgroup program failed with EPERM.
func explainAttach(err error) error {
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%w: another program may be attached to this hook of the cgroup or of a parent cgroup "+
			"without BPF_F_ALLOW_MULTI (exclusive: the kernel allows no other program below it; `bpftool cgroup tree` shows it, "+
			"and it must be re-attached with a bpf_link or BPF_F_ALLOW_MULTI), or the agent lacks CAP_BPF and CAP_NET_ADMIN", err)
	}
	return err
}

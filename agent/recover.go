package agent

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
)

// recoverPods rebuilds the registrations of kernel pods that no saved
// registration names, after pods.json was lost: a pod whose namespace is
// still found (datapath.FindNetns) is kept as the kernel holds it, as a
// Recovered pod; the others are gone and dropped (loadState removes them
// from the kernel). It says what it kept and what it dropped. keep gets
// the cookies kept. Called before serving, with no lock needed.
func (a *Agent) recoverPods(kernel []datapath.Pod, keep map[uint64]bool) error {
	var lost []uint64
	for _, kp := range kernel {
		if !keep[kp.Cookie] {
			lost = append(lost, kp.Cookie)
		}
	}
	paths := datapath.FindNetns(lost)
	var kept, dropped int
	for _, kp := range kernel {
		if keep[kp.Cookie] {
			continue
		}
		path, ok := paths[kp.Cookie]
		if !ok {
			a.log.Warn("dropping a kernel pod whose registration was lost and whose netns is gone",
				"netns_cookie", kp.Cookie, "ips", kp.IPs)
			dropped++
			continue
		}
		id := fmt.Sprintf("recovered-%d", kp.Cookie)
		a.pods[id] = &pod{
			Reg: api.PodRegistration{ContainerID: id, Netns: path, IfName: "eth0",
				IPs: append([]netip.Addr(nil), kp.IPs...)},
			Cookie: kp.Cookie, Registered: time.Now(), Recovered: true, Traffic: kp.Traffic,
			Warnings: []string{"registration rebuilt from the kernel after the state file was lost: settings kept as the kernel holds them, no kernel policy; the next CNI ADD or CHECK restores it"},
		}
		keep[kp.Cookie] = true
		kept++
		a.log.Warn("kept a kernel pod whose registration was lost, as the kernel holds it",
			"netns_cookie", kp.Cookie, "netns", path, "ips", kp.IPs)
	}
	a.log.Warn("pod registrations rebuilt from the kernel", "kept", kept, "dropped", dropped,
		"registered_before", len(keep)-kept)
	if kept > 0 {
		return a.saveState()
	}
	return nil
}

// adoptRecovered takes a Recovered pod of the same netns out of the way of
// a new registration of it, which replaces it; it returns the pod and its
// key (nil, "" if none) for undoRecovered. Called with a.mu held.
func (a *Agent) adoptRecovered(containerID string, cookie uint64) (*pod, string) {
	for id, p := range a.pods {
		if id != containerID && p.Recovered && p.Cookie == cookie {
			delete(a.pods, id)
			return p, id
		}
	}
	return nil, ""
}

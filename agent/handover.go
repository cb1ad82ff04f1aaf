package agent

import (
	"path/filepath"

	"github.com/meshsplice/meshsplice/agent/api"
)

// Registrations returns the pod registrations kept in the agent's state
// directory (pods.json), by netns cookie: what `meshsplice handover` sends
// back to the agent, with one annotation changed, to switch a pod's mode.
func Registrations(stateDir string) (map[uint64]api.PodRegistration, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	list, err := readPods(filepath.Join(stateDir, "pods.json"))
	if err != nil {
		return nil, err
	}
	regs := make(map[uint64]api.PodRegistration, len(list))
	for _, p := range list {
		regs[p.Cookie] = p.Reg
	}
	return regs, nil
}

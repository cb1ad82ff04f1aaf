package agent

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
)

// DefaultPressureInterval is how often the agent looks for kernel tables
// at their limit (datapath.PressureCounters): their growth is logged once
// per interval, and /readyz answers 503 for the interval after one grew.
const DefaultPressureInterval = 10 * time.Second

// pressureState is what the last interval showed.
type pressureState struct {
	mu     sync.Mutex
	recent []datapath.Pressure // counters that grew in the last interval
}

// pressureLoop compares the kernel's pressure counters every interval
// until ctx ends.
func (a *Agent) pressureLoop(ctx context.Context, interval time.Duration) {
	prev, err := a.dp.Counters()
	if err != nil {
		a.log.Error("read kernel counters", "error", err)
	}
	every(ctx, interval, func() {
		now, err := a.dp.Counters()
		if err != nil {
			a.log.Error("read kernel counters", "error", err)
			return
		}
		grew := datapath.PressureOf(now.Sub(prev))
		prev = now
		a.pressure.mu.Lock()
		a.pressure.recent = grew
		a.pressure.mu.Unlock()
		if len(grew) == 0 {
			return
		}
		conds := make([]string, len(grew))
		for i, p := range grew {
			conds[i] = p.String()
		}
		a.log.Warn("kernel tables at their limit: fallbacks taken in the last interval (see meshsplice status)",
			"interval", interval, "conditions", conds)
	})
}

// degraded lists what makes the node degraded now: kernel tables that
// overflowed in the last interval, and a policy refused for not fitting.
func (a *Agent) degraded() []string {
	a.pressure.mu.Lock()
	var out []string
	for _, p := range a.pressure.recent {
		out = append(out, p.String())
	}
	a.pressure.mu.Unlock()
	if ps := a.dp.PolicyState(); strings.Contains(ps.LastError, datapath.ErrPolicyMapFull.Error()) {
		out = append(out, "policy maps full: "+ps.LastError)
	}
	return out
}

// errDegraded is /readyz's answer while a kernel table is at its limit.
var errDegraded = errors.New("degraded: kernel tables at their limit; new connections take their fallback (plain TCP, or uncaptured as counted)")

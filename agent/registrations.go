package agent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
)

// Registrations outlive their pods when a CNI DEL is missed (the agent was
// down). Such a registration must never take an address from the pod that
// owns it now, so:
//   - a registration whose netns is gone is forgotten: at start (loadState),
//     before every config change re-programs the pods, and every
//     sweepInterval;
//   - an address two registrations claim goes to the pod whose netns holds
//     it; if both hold it, the second registration is refused.

// sweepInterval is how often registrations whose netns is gone are dropped.
const sweepInterval = 5 * time.Second

// sweepLoop forgets gone pods every sweepInterval until ctx ends.
func (a *Agent) sweepLoop(ctx context.Context) {
	every(ctx, sweepInterval, func() {
		a.mu.Lock()
		a.forgetGone()
		a.mu.Unlock()
	})
}

// every runs fn every interval until ctx ends.
func every(ctx context.Context, interval time.Duration, fn func()) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			fn()
		}
	}
}

// forgetGone drops the registrations whose netns is gone, from the agent
// and the kernel. Called with a.mu held.
func (a *Agent) forgetGone() {
	changed := false
	for id, p := range a.pods {
		gone, err := datapath.NetnsGone(p.Cookie, p.Reg.Netns)
		if err != nil {
			a.log.Warn("cannot tell whether a pod's netns is gone; keeping it", "pod", p.Reg.String(), "error", err)
			continue
		}
		if !gone {
			continue
		}
		a.log.Info("forgetting a pod whose netns is gone (its DEL never came)", "pod", p.Reg.String(), "netns", p.Reg.Netns)
		if err := a.dp.RemovePod(p.Cookie); err != nil {
			a.log.Error("remove a gone pod from the kernel", "pod", p.Reg.String(), "error", err)
			a.failedOn("remove_pod", p.Reg.String(), err)
			continue
		}
		delete(a.pods, id)
		changed = true
	}
	if !changed {
		return
	}
	if err := a.saveState(); err != nil {
		a.log.Error("save registrations", "error", err)
		a.failed("save_state", err)
	}
	a.policyChanged()
}

// settleIPClaims decides, for every address the new registration p (of
// container id) claims that another registration claims too, who owns it:
// a registration whose netns is gone is forgotten; one whose netns no longer
// holds the address loses its claim (re-programmed without it, with a
// warning); if the other pod still holds it, p is refused. Nothing is
// changed when p is refused. It returns warnings for p. Called with a.mu
// held.
func (a *Agent) settleIPClaims(id string, p *pod) ([]string, error) {
	type claim struct {
		id string
		ip netip.Addr
	}
	var gone []string
	var stale []claim
	for oid, o := range a.pods {
		if oid == id {
			continue
		}
		shared := sharedIPs(p.Reg.IPs, o.Reg.IPs)
		if len(shared) == 0 {
			continue
		}
		isGone, err := datapath.NetnsGone(o.Cookie, o.Reg.Netns)
		if err != nil {
			return nil, fmt.Errorf("%w: %s claims %v too and its netns cannot be checked: %w", api.ErrConflict, o.Reg, shared, err)
		}
		if isGone {
			gone = append(gone, oid)
			continue
		}
		for _, ip := range shared {
			held, err := datapath.NetnsHolds(o.Cookie, o.Reg.Netns, ip)
			if err != nil {
				return nil, fmt.Errorf("%w: %s claims %s too and its netns cannot be checked: %w", api.ErrConflict, o.Reg, ip, err)
			}
			if held {
				return nil, fmt.Errorf("%w: %s is held by the live pod %s (netns %s); two pods cannot share an address", api.ErrConflict, ip, o.Reg, o.Reg.Netns)
			}
			stale = append(stale, claim{oid, ip})
		}
	}
	for _, oid := range gone {
		o := a.pods[oid]
		a.log.Warn("forgetting a pod whose netns is gone: a new pod claims its address", "pod", o.Reg.String(), "new_pod", p.Reg.String())
		if err := a.dp.RemovePod(o.Cookie); err != nil {
			return nil, fmt.Errorf("forget %s, whose netns is gone: %w", o.Reg, err)
		}
		delete(a.pods, oid)
	}
	var warnings []string
	for _, c := range stale {
		o := a.pods[c.id]
		w := fmt.Sprintf("address %s no longer on the pod's interfaces; it now belongs to %s", c.ip, p.Reg)
		a.log.Warn("a registration lost an address it no longer holds", "pod", o.Reg.String(), "ip", c.ip, "new_pod", p.Reg.String())
		o.Reg.IPs = slices.DeleteFunc(slices.Clone(o.Reg.IPs), func(ip netip.Addr) bool { return ip == c.ip })
		if err := a.programPod(o); err != nil {
			return nil, fmt.Errorf("take %s from %s: %w", c.ip, o.Reg, err)
		}
		o.Warnings = append(o.Warnings, w)
		warnings = append(warnings, fmt.Sprintf("address %s was claimed by %s, whose netns no longer holds it", c.ip, o.Reg))
	}
	return warnings, nil
}

func sharedIPs(a, b []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, ip := range a {
		if slices.ContainsFunc(b, func(o netip.Addr) bool { return o.Unmap() == ip.Unmap() }) {
			out = append(out, ip)
		}
	}
	return out
}

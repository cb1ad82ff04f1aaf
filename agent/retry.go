package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/go-multierror"

	"github.com/meshsplice/meshsplice/datapath"
)

// What the agent failed to apply (node switches, a pod's settings, the
// policy) it applies again, all of it, after a back-off that doubles from
// retryFirst to retryMax while the failures go on, and is reset by a
// success. A new config or registration in between is applied at once
// (and a success there ends the retries as well).
const (
	retryFirst = time.Second
	retryMax   = time.Minute
)

// nextBackoff doubles d, from retryFirst up to retryMax.
func nextBackoff(d time.Duration) time.Duration {
	if d <= 0 {
		return retryFirst
	}
	return min(2*d, retryMax)
}

// reconcile makes the kernel follow the agent's state: node switches,
// every pod, the policy. Each failure is logged and counted; it returns
// whether everything was applied. Called with a.mu held.
func (a *Agent) reconcile() bool {
	ok := true
	if err := a.dp.SetNode(a.nodeSettings()); err != nil {
		a.log.Error("apply node switches", "error", err)
		a.failed("node", err)
		ok = false
	}
	var result *multierror.Error
	for id, p := range a.pods {
		if err := a.programPod(p); err != nil {
			result = multierror.Append(result, fmt.Errorf("%s: %w", id, err))
			a.failedOn("program_pod", p.Reg.String(), err)
		}
	}
	if err := result.ErrorOrNil(); err != nil {
		a.log.Error("reconcile pods with the config", "error", err)
		ok = false
	}
	return a.applyPolicy() && ok
}

// nodeSettings are the node switches: on only if the agent's flag AND the
// mesh-wide meshsplice ConfigMap say so.
func (a *Agent) nodeSettings() datapath.NodeSettings {
	return datapath.NodeSettings{Capture: a.cfg.NodeCapture && a.istio.Node.Capture, Splice: a.cfg.NodeSplice && a.istio.Node.Splice,
		AppSpliceOff: a.cfg.NodeAppSpliceOff || a.istio.Node.AppSpliceOff}
}

// applyPolicy installs the policy, logging and counting a failure.
// Called with a.mu held.
func (a *Agent) applyPolicy() bool {
	defer a.drift.soon() // every apply ends here: check the kernel after it
	if err := a.reconcilePolicy(); err != nil {
		a.log.Error("authorization policy not applied; the kernel keeps the previous one", "error", err)
		a.failed("policy", err)
		a.needRetry()
		return false
	}
	return true
}

// needRetry asks the retry loop for another reconcile.
func (a *Agent) needRetry() {
	select {
	case a.retry <- struct{}{}:
	default:
	}
}

// retryLoop reconciles again, with back-off, after each failure until ctx
// ends.
func (a *Agent) retryLoop(ctx context.Context) {
	var backoff time.Duration
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.retry:
		}
		backoff = nextBackoff(backoff)
		a.log.Info("applying again after a failure", "backoff", backoff.String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		a.mu.Lock()
		ok := a.reconcile()
		a.mu.Unlock()
		if ok {
			a.log.Info("applied after a failure: the kernel follows the agent again")
			backoff = 0
			// A failure signalled before this success is settled by it.
			select {
			case <-a.retry:
			default:
			}
		}
	}
}

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// Faults (issue 14, item 6): state files corrupt or half-written.

// stateDir returns the agent's --state-dir.
func (a *agentProc) stateDir() string {
	i := slices.Index(a.args, "--state-dir")
	if i < 0 {
		a.t.Fatal("no --state-dir on the agent's command line")
	}
	return a.args[i+1]
}

// registeredPods starts an agent (its log collected) and registers a pod
// of each name with it, sidecar-injected.
func registeredPods(t *testing.T, names ...string) (*mesh, *agentProc, []*meshPod) {
	t.Helper()
	m, configDir := agentWorld(t, "trustDomain: demo.local\n")
	ag := newAgent(t, m, configDir)
	ag.withLogs()
	ag.start()
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	var pods []*meshPod
	for _, n := range names {
		p := m.addPod(node, n, nil)
		ag.register(p, injected())
		pods = append(pods, p)
	}
	return m, ag, pods
}

// TestCorruptStateFilesKeepPodsMeshed: the agent restarts on a torn
// pods.json and identities.json: it starts, moves each aside, keeps the live
// pods the kernel holds (rebuilt from the kernel, not un-meshed), drops the
// kernel pod whose netns is gone, says so, and a new CNI ADD restores the
// full registration. Failed before the fix: the agent refused to start
// ("load pods: ... unexpected end of JSON input").
func TestCorruptStateFilesKeepPodsMeshed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(b []byte) []byte
	}{
		{"half-written", func(b []byte) []byte { return b[:len(b)/2] }},
		{"garbage", func([]byte) []byte { return []byte("\x00\x00not json") }},
		{"wrong shape", func([]byte) []byte { return []byte(`[{"netns_cookie": 0}]`) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, ag, mp := registeredPods(t, "live", "gone")
			live, gone := mp[0], mp[1]
			if st := ag.status(m.pin); len(st.Pods) != 2 {
				t.Fatalf("kernel pods: %+v", st.Pods)
			}
			ag.stop()

			// The gone pod's netns disappears while the agent is down: its
			// processes end and its name is removed.
			gone.App.Kill()
			gone.App.WaitTimeout(5 * time.Second)
			if err := lab.RemoveNetns(gone.NS.Path()); err != nil {
				t.Fatal(err)
			}
			dir := ag.stateDir()
			for _, f := range []string{"pods.json", "identities.json"} {
				b, err := os.ReadFile(filepath.Join(dir, f))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, f), tc.corrupt(b), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			ag.start()

			st := ag.status(m.pin)
			if len(st.Pods) != 1 || st.Pods[0].Cookie != live.Cookie || !st.Pods[0].Traffic.Capture {
				t.Fatalf("kernel pods after a restart on corrupt state: %+v, want only the live one, captured", st.Pods)
			}
			var pods []api.PodStatus
			if err := json.Unmarshal([]byte(ag.get("/pods")), &pods); err != nil {
				t.Fatal(err)
			}
			if len(pods) != 1 || pods[0].Pod.Netns != live.NS.Path() || len(pods[0].Warnings) == 0 {
				t.Fatalf("agent /pods: %+v, want the live pod, rebuilt, with a warning", pods)
			}
			for _, f := range []string{"pods.json", "identities.json"} {
				if aside, _ := filepath.Glob(filepath.Join(dir, f+".corrupt-*")); len(aside) != 1 {
					t.Fatalf("%s not moved aside: %v", f, aside)
				}
			}
			for _, want := range []string{"rebuilding them from the kernel", "kept a kernel pod", "dropping a kernel pod", "numbering them afresh"} {
				if _, err := ag.proc.WaitLine(5*time.Second, func(l string) bool { return strings.Contains(l, want) }); err != nil {
					t.Fatalf("agent log lacks %q:\n%s", want, strings.Join(ag.proc.Lines(), "\n"))
				}
			}
			if !strings.Contains(ag.get("/metrics"), `meshsplice_apply_failures_total{what="load_state"} 1`) {
				t.Fatal("corrupt pods.json not counted")
			}

			// The CNI plugin's next ADD replaces the rebuilt registration.
			ag.register(live, injected())
			pods = nil
			if err := json.Unmarshal([]byte(ag.get("/pods")), &pods); err != nil {
				t.Fatal(err)
			}
			if len(pods) != 1 || pods[0].Pod.ContainerID != "c-"+live.Name || len(pods[0].Warnings) != 0 {
				t.Fatalf("after ADD: %+v", pods)
			}
			// And a restart reads the rewritten files cleanly.
			ag.stop()
			ag.start()
			if st := ag.status(m.pin); len(st.Pods) != 1 || st.Pods[0].Cookie != live.Cookie {
				t.Fatalf("kernel pods after a clean restart: %+v", st.Pods)
			}
		})
	}
}

// TestSweepKeepsPodOnTransientNetnsError: the periodic sweep forgets a pod
// only when its netns is really gone. With the agent out of file
// descriptors (EMFILE: its netns cannot be opened, for a while), the live
// pod stays registered and in the kernel; once descriptors are back, the
// sweep still forgets a pod whose netns is really gone.
func TestSweepKeepsPodOnTransientNetnsError(t *testing.T) {
	m, ag, pods := registeredPods(t, "live")
	live := pods[0]

	pid := ag.proc.PID()
	var lim unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &lim); err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	tight := unix.Rlimit{Cur: uint64(len(fds)), Max: lim.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &tight, nil); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &lim, nil); err != nil {
				t.Errorf("restore the agent's file limit: %v", err)
			}
		}
	}
	t.Cleanup(restore)
	if _, err := ag.proc.WaitLine(20*time.Second, func(l string) bool {
		return strings.Contains(l, "cannot tell whether a pod's netns is gone; keeping it")
	}); err != nil {
		t.Fatalf("no sweep under EMFILE: %v\n%s", err, strings.Join(ag.proc.Lines(), "\n"))
	}
	if !kernelHasPod(t, m.pin, live.Cookie) {
		t.Fatal("a transient error reading the netns un-meshed a live pod")
	}
	restore()
	if len(agentPods(t, ag)) != 1 {
		t.Fatalf("agent pods: %+v", agentPods(t, ag))
	}

	// A netns that is really gone is still forgotten.
	live.App.Kill()
	live.App.WaitTimeout(5 * time.Second)
	if err := lab.RemoveNetns(live.NS.Path()); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the gone pod forgotten", 20*time.Second, func() bool {
		return !kernelHasPod(t, m.pin, live.Cookie) && len(agentPods(t, ag)) == 0
	})
}

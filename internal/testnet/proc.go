package testnet

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/internal/lab"
)

// StartOpts configures Start.
type StartOpts struct {
	// NetNS is the network namespace to run in; nil means the test's own.
	NetNS *NetNS
	// Cgroup is the cgroup the process is born in; nil means the test's own.
	Cgroup *Cgroup
	// UID and GID are the credentials of the program when nonzero. The
	// supplementary groups are cleared when either is set.
	UID, GID int
	// Args is the program and its arguments. The program is looked up in
	// PATH.
	Args []string
	// Env is added to the test's environment.
	Env []string
	// Dir is the working directory; empty means the test's.
	Dir string
	// Name labels the process in the test log; default the base name of
	// Args[0].
	Name string
}

// Proc is a process started by Start. Its standard output is collected line
// by line (see Lines, WaitLine, WaitEvent) and also logged; its standard
// error goes to the test log.
type Proc struct {
	// Cmd is the underlying command; do not call its Wait.
	Cmd *exec.Cmd

	p       *lab.Proc
	name    string
	mu      sync.Mutex
	stopLog bool
}

// Start starts a process inside opts.NetNS and opts.Cgroup (lab.Start). The
// network namespace is entered with "nsenter --net=PATH" (never "ip netns
// exec", which remounts /sys and hides the cgroup2 mount); the cgroup is
// entered at birth with clone3(CLONE_INTO_CGROUP), so every socket the
// program creates belongs to it. With UID/GID set, nsenter switches
// credentials (-S/-G) right before executing the program, so the pid
// returned is the program's own and it runs with those credentials from
// its first instruction.
//
// The test's cleanup kills the process (if still running) and waits for it.
func Start(tb testing.TB, opts StartOpts) *Proc {
	tb.Helper()
	if len(opts.Args) == 0 {
		tb.Fatalf("testnet: Start: no program given")
	}
	name := opts.Name
	if name == "" {
		name = filepath.Base(opts.Args[0])
	}
	pr := &Proc{name: name}
	lopts := lab.ProcOpts{
		Name: name, Cgroup: opts.Cgroup, UID: opts.UID, GID: opts.GID,
		Args: opts.Args, Env: opts.Env, Dir: opts.Dir, KeepStdout: true,
		OnLine: func(stream, line string) {
			pr.mu.Lock()
			defer pr.mu.Unlock()
			switch {
			case pr.stopLog:
			case pr.Cmd == nil: // a line before Start returned
				tb.Logf("%s %s: %s", name, stream, line)
			default:
				tb.Logf("%s[%d] %s: %s", name, pr.Cmd.Process.Pid, stream, line)
			}
		},
	}
	if opts.NetNS != nil {
		lopts.Netns = opts.NetNS.ns
	}
	p, err := lab.Start(lopts)
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	pr.mu.Lock()
	pr.p, pr.Cmd = p, p.Cmd
	pr.mu.Unlock()
	pid := p.PID()
	tb.Cleanup(func() {
		p.Signal(os.Kill)
		select {
		case <-p.Done():
		case <-time.After(15 * time.Second):
			tb.Errorf("testnet: %s[%d] did not exit after SIGKILL", name, pid)
		}
		pr.mu.Lock()
		pr.stopLog = true
		pr.mu.Unlock()
	})
	return pr
}

// PID returns the process id (of the program itself, nsenter having
// exec'ed it).
func (p *Proc) PID() int { return p.p.PID() }

// Done is closed when the process has exited and its output is collected.
func (p *Proc) Done() <-chan struct{} { return p.p.Done() }

// Wait waits for the process to exit and returns its exit error (nil for
// exit status 0, an *exec.ExitError otherwise).
func (p *Proc) Wait() error {
	<-p.p.Done()
	return p.p.ExitErr()
}

// WaitTimeout is Wait with a limit; it returns an error, without killing
// the process, if it has not exited within d.
func (p *Proc) WaitTimeout(d time.Duration) error {
	select {
	case <-p.p.Done():
		return p.Wait()
	case <-time.After(d):
		return fmt.Errorf("%s[%d] still running after %v", p.name, p.PID(), d)
	}
}

// ExitCode returns the exit code, or -1 while running or when killed by a
// signal.
func (p *Proc) ExitCode() int {
	select {
	case <-p.p.Done():
		return p.Cmd.ProcessState.ExitCode()
	default:
		return -1
	}
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.p.Signal(sig) }

// Kill sends SIGKILL and waits for the process to exit. Killing an exited
// process is not an error.
func (p *Proc) Kill() error {
	if err := p.p.Signal(os.Kill); err != nil {
		return err
	}
	<-p.p.Done()
	return nil
}

// Lines returns the standard output lines received so far.
func (p *Proc) Lines() []string { return p.p.Stdout() }

// WaitLine waits until a standard output line (including lines already
// received) satisfies match and returns it. It returns an error after
// timeout, or when the process exits without printing such a line.
func (p *Proc) WaitLine(timeout time.Duration, match func(line string) bool) (string, error) {
	return p.p.WaitLine(context.Background(), timeout, match)
}

// Event is one JSON object printed on a line of standard output (Str, Int,
// Bool read its fields).
type Event = lab.Event

// Events returns the standard output lines received so far that are JSON
// objects.
func (p *Proc) Events() []Event {
	var evs []Event
	for _, l := range p.Lines() {
		if ev, ok := lab.ParseEvent(l); ok {
			evs = append(evs, ev)
		}
	}
	return evs
}

// WaitEvent waits for a JSON line whose "event" field is name and that
// satisfies every match function, and returns it (see WaitLine).
func (p *Proc) WaitEvent(timeout time.Duration, name string, match ...func(Event) bool) (Event, error) {
	ev, err := p.p.WaitEvent(context.Background(), name, timeout, match...)
	if err != nil {
		return nil, fmt.Errorf("wait for event %q: %w", name, err)
	}
	return ev, nil
}

// Tail returns the process's last output lines, for error messages.
func (p *Proc) Tail() string { return strings.TrimSpace(p.p.Tail()) }

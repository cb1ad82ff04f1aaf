package testnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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

	name string
	done chan struct{}

	mu      sync.Mutex
	lines   []string
	notify  chan struct{} // closed and replaced on every new line and at exit
	exited  bool
	waitErr error
	stopLog bool
}

// Start starts a process inside opts.NetNS and opts.Cgroup. The network
// namespace is entered with "nsenter --net=PATH" (never "ip netns exec",
// which remounts /sys and hides the cgroup2 mount); the cgroup is entered at
// birth with clone3(CLONE_INTO_CGROUP), so every socket the program creates
// belongs to it. With UID/GID set, nsenter switches credentials (-S/-G)
// right before executing the program, so the pid returned is the program's
// own and it runs with those credentials from its first instruction.
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

	args := opts.Args
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if opts.NetNS != nil {
		// nsenter does not fork when entering only a network namespace:
		// it calls setns, drops credentials if asked and execs the program.
		pre := []string{"nsenter", "--net=" + opts.NetNS.Path()}
		if opts.UID != 0 || opts.GID != 0 {
			// Both, always: --setgid is what makes nsenter clear the
			// supplementary groups.
			pre = append(pre, "--setuid", strconv.Itoa(opts.UID), "--setgid", strconv.Itoa(opts.GID))
		}
		args = append(append(pre, "--"), args...)
	} else if opts.UID != 0 || opts.GID != 0 {
		attr.Credential = &syscall.Credential{Uid: uint32(opts.UID), Gid: uint32(opts.GID)}
	}
	if opts.Cgroup != nil {
		attr.UseCgroupFD = true
		attr.CgroupFD = opts.Cgroup.FD()
	}

	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = attr
	cmd.Dir = opts.Dir
	if len(opts.Env) > 0 {
		cmd.Env = append(os.Environ(), opts.Env...)
	}
	cmd.WaitDelay = 5 * time.Second

	p := &Proc{Cmd: cmd, name: name, done: make(chan struct{}), notify: make(chan struct{})}
	logLine := func(stream, line string) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if !p.stopLog {
			// cmd.Process is set before the output-copying goroutines
			// that call this start.
			tb.Logf("%s[%d] %s: %s", name, cmd.Process.Pid, stream, line)
		}
	}
	stdout := &lineWriter{fn: func(line string) {
		logLine("stdout", line)
		p.addLine(line)
	}}
	stderr := &lineWriter{fn: func(line string) { logLine("stderr", line) }}
	cmd.Stdout = stdout
	cmd.Stderr = stderr

	// The process is started, and waited for, on a goroutine locked to its
	// OS thread: Pdeathsig fires when the thread that forked the child exits,
	// and Go terminates threads whose goroutine exits while locked (as
	// namespace helpers do on purpose), so the forking thread must outlive
	// the child.
	startErr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			startErr <- err
			return
		}
		startErr <- nil
		err := cmd.Wait()
		stdout.flush()
		stderr.flush()
		p.mu.Lock()
		p.exited = true
		p.waitErr = err
		close(p.notify)
		p.notify = make(chan struct{})
		p.mu.Unlock()
		close(p.done)
	}()
	if err := <-startErr; err != nil {
		tb.Fatalf("testnet: start %s: %v", strings.Join(args, " "), err)
	}
	pid := cmd.Process.Pid

	tb.Cleanup(func() {
		_ = p.Kill()
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			tb.Errorf("testnet: %s[%d] did not exit after SIGKILL", name, pid)
		}
		p.mu.Lock()
		p.stopLog = true
		p.mu.Unlock()
	})
	return p
}

// PID returns the process id (of the program itself, nsenter having
// exec'ed it).
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Done is closed when the process has exited and its output is collected.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns its exit error (nil for
// exit status 0, an *exec.ExitError otherwise).
func (p *Proc) Wait() error {
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitErr
}

// WaitTimeout is Wait with a limit; it returns an error, without killing
// the process, if it has not exited within d.
func (p *Proc) WaitTimeout(d time.Duration) error {
	select {
	case <-p.done:
		return p.Wait()
	case <-time.After(d):
		return fmt.Errorf("%s[%d] still running after %v", p.name, p.PID(), d)
	}
}

// ExitCode returns the exit code, or -1 while running or when killed by a
// signal.
func (p *Proc) ExitCode() int {
	select {
	case <-p.done:
		return p.Cmd.ProcessState.ExitCode()
	default:
		return -1
	}
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error {
	if err := p.Cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s[%d]: %w", p.name, p.PID(), err)
	}
	return nil
}

// Kill sends SIGKILL and waits for the process to exit. Killing an exited
// process is not an error.
func (p *Proc) Kill() error {
	if err := p.Signal(os.Kill); err != nil {
		return err
	}
	<-p.done
	return nil
}

// Lines returns the standard output lines received so far.
func (p *Proc) Lines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

// WaitLine waits until a standard output line (including lines already
// received) satisfies match and returns it. It returns an error after
// timeout, or when the process exits without printing such a line.
func (p *Proc) WaitLine(timeout time.Duration, match func(line string) bool) (string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	seen := 0
	for {
		p.mu.Lock()
		lines := p.lines[seen:]
		seen = len(p.lines)
		ch, exited, werr := p.notify, p.exited, p.waitErr
		p.mu.Unlock()
		for _, l := range lines {
			if match(l) {
				return l, nil
			}
		}
		if exited {
			return "", fmt.Errorf("%s[%d] exited (%v) without printing the expected line", p.name, p.PID(), werr)
		}
		select {
		case <-ch:
		case <-timer.C:
			return "", fmt.Errorf("%s[%d] printed no expected line within %v", p.name, p.PID(), timeout)
		}
	}
}

// Event is one JSON object printed on a line of standard output.
type Event map[string]any

// Str returns field k as a string ("" if absent or not a string).
func (e Event) Str(k string) string {
	s, _ := e[k].(string)
	return s
}

// Int returns numeric field k (0 if absent or not a number).
func (e Event) Int(k string) int64 {
	f, _ := e[k].(float64)
	return int64(f)
}

// Bool returns boolean field k (false if absent or not a boolean).
func (e Event) Bool(k string) bool {
	b, _ := e[k].(bool)
	return b
}

func parseEvent(line string) (Event, bool) {
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "{") {
		return nil, false
	}
	var ev Event
	if err := json.Unmarshal([]byte(line), &ev); err != nil {
		return nil, false
	}
	return ev, true
}

// Events returns the standard output lines received so far that are JSON
// objects.
func (p *Proc) Events() []Event {
	var evs []Event
	for _, l := range p.Lines() {
		if ev, ok := parseEvent(l); ok {
			evs = append(evs, ev)
		}
	}
	return evs
}

// WaitEvent waits for a JSON line whose "event" field is name and that
// satisfies every match function, and returns it (see WaitLine).
func (p *Proc) WaitEvent(timeout time.Duration, name string, match ...func(Event) bool) (Event, error) {
	var found Event
	_, err := p.WaitLine(timeout, func(line string) bool {
		ev, ok := parseEvent(line)
		if !ok || ev.Str("event") != name {
			return false
		}
		for _, m := range match {
			if !m(ev) {
				return false
			}
		}
		found = ev
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("wait for event %q: %w", name, err)
	}
	return found, nil
}

func (p *Proc) addLine(line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lines = append(p.lines, line)
	close(p.notify)
	p.notify = make(chan struct{})
}

// lineWriter calls fn for every complete line written to it.
type lineWriter struct {
	mu  sync.Mutex
	buf []byte
	fn  func(string)
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		line := string(bytes.TrimSuffix(w.buf[:i], []byte("\r")))
		w.buf = w.buf[i+1:]
		w.fn(line)
	}
	return len(b), nil
}

// flush emits a last line that had no trailing newline.
func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		line := string(w.buf)
		w.buf = nil
		w.fn(line)
	}
}

package lab

import (
	"bytes"
	"context"
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
	"time"
)

// ProcOpts configures Start.
type ProcOpts struct {
	// Name labels the process in errors; default the base name of Args[0].
	Name string
	// Netns is the namespace to run in (nsenter --net, which keeps the
	// caller's /sys and cgroup mounts, unlike "ip netns exec"); nil means
	// the caller's.
	Netns *Netns
	// Cgroup is the cgroup the process is born in (clone3
	// CLONE_INTO_CGROUP): every socket it creates belongs to it. nil means
	// the caller's.
	Cgroup *Cgroup
	// UID and GID switch credentials right before the program runs when
	// either is nonzero (both are set, and the supplementary groups
	// cleared).
	UID, GID int
	// CPUs pins the program with taskset -c (e.g. "0", "0,1"); empty means
	// unpinned.
	CPUs string
	// Args is the program and its arguments, looked up in PATH.
	Args []string
	// Env is added to the caller's environment.
	Env []string
	// Dir is the working directory; empty means the caller's.
	Dir string
	// OnLine, when set, is called for every line the program prints, as it
	// arrives, on the goroutine copying that stream (stream is "stdout" or
	// "stderr"): keep it short.
	OnLine func(stream, line string)
	// KeepStdout keeps every standard output line (Stdout, WaitLine);
	// otherwise only JSON event lines and the last lines are kept.
	KeepStdout bool
}

// Proc is a running program.
type Proc struct {
	// Cmd is the command; do not Wait on it.
	Cmd  *exec.Cmd
	name string
	keep bool
	done chan struct{}

	mu      sync.Mutex
	events  []Event
	stdout  []string
	tail    []string      // last lines of both streams, for errors
	notify  chan struct{} // closed and replaced on every line and at exit
	exited  bool
	waitErr error
}

// Event is one JSON object a program printed on a line of standard output.
type Event map[string]any

// Str returns field k as a string ("" if absent or not a string).
func (e Event) Str(k string) string { s, _ := e[k].(string); return s }

// Int returns numeric field k (0 if absent or not a number).
func (e Event) Int(k string) int64 { f, _ := e[k].(float64); return int64(f) }

// Bool returns boolean field k (false if absent or not a boolean).
func (e Event) Bool(k string) bool { b, _ := e[k].(bool); return b }

// Decode decodes the event into v (a struct with JSON tags).
func (e Event) Decode(v any) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// ParseEvent returns the JSON object a line holds, if it is one.
func ParseEvent(line string) (Event, bool) {
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

const tailLines = 20

// Start starts a program as opts describe, in a process group of its own
// (a Ctrl-C meant for the caller does not reach it). The network namespace
// is entered with "nsenter --net=PATH", which execs the program in place
// (switching credentials with --setuid/--setgid last), so the pid is the
// program's own. The program is killed with SIGKILL if the caller's process
// dies (the forking thread is kept for the child's life, which Pdeathsig
// needs), and by its cgroup's removal at the latest.
func Start(opts ProcOpts) (*Proc, error) {
	if len(opts.Args) == 0 {
		return nil, errors.New("start: no program")
	}
	name := opts.Name
	if name == "" {
		name = filepath.Base(opts.Args[0])
	}
	args := opts.Args
	if opts.CPUs != "" {
		args = append([]string{"taskset", "-c", opts.CPUs}, args...)
	}
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if opts.Netns != nil {
		pre := []string{"nsenter", "--net=" + opts.Netns.Path}
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
	cmd.Env = append(os.Environ(), opts.Env...)
	// A child that keeps the output pipes open (a daemon it started) must
	// not keep Wait from returning.
	cmd.WaitDelay = 5 * time.Second
	p := &Proc{Cmd: cmd, name: name, keep: opts.KeepStdout, done: make(chan struct{}), notify: make(chan struct{})}
	stdout := &LineWriter{Line: func(line string) { p.line("stdout", line, opts.OnLine) }}
	stderr := &LineWriter{Line: func(line string) { p.line("stderr", line, opts.OnLine) }}
	cmd.Stdout, cmd.Stderr = stdout, stderr

	startErr := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the forking thread exits, and Go ends a
		// thread whose goroutine exits locked (as namespace helpers do on
		// purpose): the forking thread must outlive the child.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			startErr <- fmt.Errorf("start %s: %w", strings.Join(args, " "), err)
			return
		}
		startErr <- nil
		err := cmd.Wait()
		stdout.Flush()
		stderr.Flush()
		p.mu.Lock()
		p.exited, p.waitErr = true, err
		close(p.notify)
		p.notify = make(chan struct{})
		p.mu.Unlock()
		close(p.done)
	}()
	if err := <-startErr; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *Proc) line(stream, line string, onLine func(stream, line string)) {
	if onLine != nil {
		onLine(stream, line)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if stream == "stdout" {
		if p.keep {
			p.stdout = append(p.stdout, line)
		}
		if ev, ok := ParseEvent(line); ok {
			p.events = append(p.events, ev)
		}
	}
	p.tail = append(p.tail, stream+": "+line)
	if len(p.tail) > tailLines {
		p.tail = p.tail[len(p.tail)-tailLines:]
	}
	close(p.notify)
	p.notify = make(chan struct{})
}

// PID is the process id (of the program itself, nsenter having exec'ed it).
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Done is closed when the program has exited and its output is read.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Events returns the JSON event lines printed so far.
func (p *Proc) Events() []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Event(nil), p.events...)
}

// Stdout returns every standard output line so far (with KeepStdout).
func (p *Proc) Stdout() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.stdout...)
}

// Tail returns the program's last output lines, for error messages.
func (p *Proc) Tail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.tail, "\n")
}

// ExitErr returns the error of the ended program (nil for exit status 0,
// an *exec.ExitError otherwise), or nil while it runs.
func (p *Proc) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitErr
}

// waitFor calls check with every new state (lines so far, exited) until it
// returns true, the program has exited (then check saw the last state), the
// timeout passes or ctx ends.
func (p *Proc) waitFor(ctx context.Context, timeout time.Duration, what string, check func() bool) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		p.mu.Lock()
		ch, exited, werr := p.notify, p.exited, p.waitErr
		p.mu.Unlock()
		if check() {
			return nil
		}
		if exited {
			return fmt.Errorf("%s[%d] exited (%v) without %s; last output:\n%s", p.name, p.PID(), werr, what, p.Tail())
		}
		select {
		case <-ch:
		case <-timer.C:
			return fmt.Errorf("%s[%d]: no %s within %v; last output:\n%s", p.name, p.PID(), what, timeout, p.Tail())
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WaitEvent waits for an event line whose "event" field is name and that
// satisfies every match function.
func (p *Proc) WaitEvent(ctx context.Context, name string, timeout time.Duration, match ...func(Event) bool) (Event, error) {
	var found Event
	seen := 0
	err := p.waitFor(ctx, timeout, fmt.Sprintf("a %q event", name), func() bool {
		p.mu.Lock()
		evs := p.events[seen:]
		seen = len(p.events)
		p.mu.Unlock()
	next:
		for _, ev := range evs {
			if ev.Str("event") != name {
				continue
			}
			for _, m := range match {
				if !m(ev) {
					continue next
				}
			}
			found = ev
			return true
		}
		return false
	})
	return found, err
}

// WaitLine waits until a standard output line (those already printed
// included) satisfies match, and returns it. It needs KeepStdout.
func (p *Proc) WaitLine(ctx context.Context, timeout time.Duration, match func(line string) bool) (string, error) {
	var found string
	seen := 0
	err := p.waitFor(ctx, timeout, "the expected line", func() bool {
		p.mu.Lock()
		lines := p.stdout[seen:]
		seen = len(p.stdout)
		p.mu.Unlock()
		for _, l := range lines {
			if match(l) {
				found = l
				return true
			}
		}
		return false
	})
	return found, err
}

// Wait waits for the program to exit and returns its error (a nonzero exit
// is an error), or kills it after timeout or when ctx ends.
func (p *Proc) Wait(ctx context.Context, timeout time.Duration) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		p.Kill()
		return fmt.Errorf("%s did not finish within %v; last output:\n%s", p.name, timeout, p.Tail())
	case <-ctx.Done():
		p.Kill()
		return ctx.Err()
	}
	if err := p.ExitErr(); err != nil {
		return fmt.Errorf("%s: %w; last output:\n%s", p.name, err, p.Tail())
	}
	return nil
}

// Signal sends sig to the program; an ended program is not an error.
func (p *Proc) Signal(sig os.Signal) error {
	if err := p.Cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s[%d]: %w", p.name, p.PID(), err)
	}
	return nil
}

// Stop asks the program to end (SIGTERM), kills it after grace, and waits.
func (p *Proc) Stop(grace time.Duration) {
	if p.Exited() {
		return
	}
	p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
	}
}

// Kill kills the program (SIGKILL) and waits for it.
func (p *Proc) Kill() {
	p.Signal(os.Kill)
	<-p.done
}

// Exited reports whether the program has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// LineWriter calls Line for every complete line written to it (without
// "\n" or "\r\n"); Flush hands over a last line without one.
type LineWriter struct {
	Line func(string)
	mu   sync.Mutex
	buf  []byte
}

func (w *LineWriter) Write(b []byte) (int, error) {
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
		w.Line(line)
	}
	return len(b), nil
}

// Flush emits a last line that had no trailing newline.
func (w *LineWriter) Flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		line := string(w.buf)
		w.buf = nil
		w.Line(line)
	}
}

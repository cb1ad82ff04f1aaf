package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ProcOpts configures Start.
type ProcOpts struct {
	// Name labels the process in errors.
	Name string
	// Netns is the namespace to run in (nsenter --net, which keeps the
	// caller's /sys and cgroup mounts, unlike "ip netns exec").
	Netns *Netns
	// Cgroup is the cgroup the process is born in (clone3
	// CLONE_INTO_CGROUP): every socket it creates belongs to it.
	Cgroup *Cgroup
	// UID and GID switch credentials right before the program runs when
	// either is nonzero.
	UID, GID int
	// CPUs pins the program with taskset -c (e.g. "0", "0,1"); empty means
	// unpinned.
	CPUs string
	// Args is the program and its arguments.
	Args []string
	// Env is added to the caller's environment.
	Env []string
	// Dir is the working directory.
	Dir string
	// OnLine, when set, is called for every line the program prints, as it
	// arrives, on the goroutine reading that stream (stream is "stdout" or
	// "stderr"): keep it short.
	OnLine func(stream, line string)
	// KeepStdout keeps every standard output line (Stdout returns them);
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
	tail    []string // last lines of both streams, for errors
	notify  chan struct{}
	exited  bool
	waitErr error
}

// Event is one JSON object a program printed on a line of standard output.
type Event map[string]any

// Str returns field k as a string.
func (e Event) Str(k string) string { s, _ := e[k].(string); return s }

// Decode decodes the event into v (a struct with JSON tags).
func (e Event) Decode(v any) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

const tailLines = 20

// Start starts a program as opts describe. It is killed with SIGKILL if the
// caller's process dies (the forking thread is kept for the child's life,
// which Pdeathsig needs), and by the lab's cgroup removal at the latest.
func Start(opts ProcOpts) (*Proc, error) {
	if len(opts.Args) == 0 {
		return nil, errors.New("start: no program")
	}
	name := opts.Name
	if name == "" {
		name = opts.Args[0]
	}
	args := opts.Args
	if opts.CPUs != "" {
		args = append([]string{"taskset", "-c", opts.CPUs}, args...)
	}
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if opts.Netns != nil {
		pre := []string{"nsenter", "--net=" + opts.Netns.Path}
		if opts.UID != 0 || opts.GID != 0 {
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
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	p := &Proc{Cmd: cmd, name: name, keep: opts.KeepStdout, done: make(chan struct{}), notify: make(chan struct{})}

	startErr := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the forking thread exits: keep it.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			startErr <- fmt.Errorf("start %s: %w", name, err)
			return
		}
		startErr <- nil
		var readers sync.WaitGroup
		readers.Go(func() { p.read("stdout", stdout, opts.OnLine) })
		readers.Go(func() { p.read("stderr", stderr, opts.OnLine) })
		readers.Wait()
		err := cmd.Wait()
		p.mu.Lock()
		p.exited, p.waitErr = true, err
		close(p.notify)
		p.mu.Unlock()
		close(p.done)
	}()
	if err := <-startErr; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *Proc) read(stream string, r io.Reader, onLine func(stream, line string)) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		if onLine != nil {
			onLine(stream, line)
		}
		p.mu.Lock()
		if stream == "stdout" {
			if p.keep {
				p.stdout = append(p.stdout, line)
			}
			if strings.HasPrefix(line, "{") {
				var ev Event
				if json.Unmarshal([]byte(line), &ev) == nil {
					p.events = append(p.events, ev)
				}
			}
		}
		p.tail = append(p.tail, stream+": "+line)
		if len(p.tail) > tailLines {
			p.tail = p.tail[len(p.tail)-tailLines:]
		}
		close(p.notify)
		p.notify = make(chan struct{})
		p.mu.Unlock()
	}
	// Drain what a too-long line left, so the program never blocks.
	io.Copy(io.Discard, r)
}

// PID is the process id (of nsenter, which execs the program in place).
func (p *Proc) PID() int { return p.Cmd.Process.Pid }

// Events returns the JSON event lines printed so far.
func (p *Proc) Events() []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Event(nil), p.events...)
}

// Stdout returns every standard output line (with KeepStdout).
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

// WaitEvent waits for an event line whose "event" field is name.
func (p *Proc) WaitEvent(ctx context.Context, name string, timeout time.Duration) (Event, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		p.mu.Lock()
		for _, ev := range p.events {
			if ev.Str("event") == name {
				p.mu.Unlock()
				return ev, nil
			}
		}
		ch, exited, werr := p.notify, p.exited, p.waitErr
		p.mu.Unlock()
		if exited {
			return nil, fmt.Errorf("%s exited (%v) without a %q event; last output:\n%s", p.name, werr, name, p.Tail())
		}
		select {
		case <-ch:
		case <-timer.C:
			return nil, fmt.Errorf("%s: no %q event within %v; last output:\n%s", p.name, name, timeout, p.Tail())
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
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
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.waitErr != nil {
		return fmt.Errorf("%s: %w; last output:\n%s", p.name, p.waitErr, strings.Join(p.tail, "\n"))
	}
	return nil
}

// Stop asks the program to end (SIGTERM), kills it after grace, and waits.
func (p *Proc) Stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
	}
}

// Kill kills the program and waits for it.
func (p *Proc) Kill() {
	p.Cmd.Process.Kill()
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

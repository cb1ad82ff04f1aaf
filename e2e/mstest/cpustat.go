package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// CPU readings at the edges of a measurement window. meshsplice bench
// measures the CPU time of the pods' cgroups per request; a reading taken
// by the benchmark when it gets to a window mark can come any time later on
// a loaded machine, after the window's work, so the programs that define
// the window read the cgroups themselves, at the moment they mark it, and
// print the readings in their window events.

// cpuTimes is a cgroup's cpu.stat reading.
type cpuTimes struct {
	TotalUS  int64 `json:"total_us"`
	UserUS   int64 `json:"user_us"`
	SystemUS int64 `json:"system_us"`
}

// cpuStats is the --cpu-stat flag: role name -> cgroup directory.
type cpuStats map[string]string

func (c *cpuStats) String() string { return fmt.Sprint(map[string]string(*c)) }

func (c *cpuStats) Set(v string) error {
	role, dir, ok := strings.Cut(v, "=")
	if !ok || role == "" || dir == "" {
		return errors.New("want ROLE=CGROUP_DIR")
	}
	if *c == nil {
		*c = cpuStats{}
	}
	(*c)[role] = dir
	return nil
}

const cpuStatUsage = "ROLE=CGROUP_DIR: read the cgroup's cpu.stat at each edge of the measurement window and print it in the window event (repeatable)"

// read reads every cgroup's cpu.stat; nil when there are none.
func (c cpuStats) read() (map[string]cpuTimes, error) {
	if len(c) == 0 {
		return nil, nil
	}
	m := make(map[string]cpuTimes, len(c))
	for role, dir := range c {
		total, user, system, err := cgroups.CPUStat(dir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", role, err)
		}
		m[role] = cpuTimes{TotalUS: total.Microseconds(), UserUS: user.Microseconds(), SystemUS: system.Microseconds()}
	}
	return m, nil
}

// markEvent returns the window event of phase with the readings taken now.
func (c cpuStats) markEvent(phase string) windowEvent {
	ev := windowEvent{Event: "window", Phase: phase}
	cpu, err := c.read()
	ev.CPU, ev.UnixNS = cpu, time.Now().UnixNano()
	if err != nil {
		ev.Error = err.Error()
	}
	return ev
}

// runWindow is `mstest window`: it runs a load generator that announces
// its measurement window on standard error (fortio: "Starting at ...",
// "Ended after ..."), reads the --cpu-stat cgroups as soon as it sees each
// of those lines, and prints a window event for each on standard error,
// after the line. The program's standard output is passed through
// untouched; its exit status is mstest's.
func runWindow(args []string) int {
	fs := flag.NewFlagSet("window", flag.ContinueOnError)
	var stats cpuStats
	fs.Var(&stats, "cpu-stat", cpuStatUsage)
	start := fs.String("start", "", "prefix of the program's stderr line that starts the window (required)")
	end := fs.String("end", "", "prefix of the program's stderr line that ends the window (required)")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: mstest window --cpu-stat ROLE=DIR... --start PREFIX --end PREFIX -- PROGRAM [ARGS...]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *start == "" || *end == "" || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
	cmd.Stdin, cmd.Stdout = os.Stdin, os.Stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	pipe, err := cmd.StderrPipe()
	if err != nil {
		logf("window: %v", err)
		return 1
	}
	if err := cmd.Start(); err != nil {
		logf("window: %v", err)
		return 1
	}
	phase := "start"
	sc := bufio.NewScanner(pipe)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		var ev *windowEvent
		if (phase == "start" && strings.HasPrefix(line, *start)) || (phase == "end" && strings.HasPrefix(line, *end)) {
			e := stats.markEvent(phase)
			ev = &e
			phase = map[string]string{"start": "end", "end": ""}[phase]
		}
		fmt.Fprintln(os.Stderr, line)
		if ev != nil {
			b, _ := json.Marshal(ev)
			fmt.Fprintln(os.Stderr, string(b))
		}
	}
	io.Copy(os.Stderr, pipe) // after a line too long for the scanner
	if err := cmd.Wait(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) && exit.ExitCode() > 0 {
			return exit.ExitCode()
		}
		logf("window: %v", err)
		return 1
	}
	return 0
}

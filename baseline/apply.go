package baseline

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"

	"github.com/hashicorp/go-multierror"
)

var (
	// ErrAlreadyApplied is returned by Apply when the namespace already holds
	// one of the chains the rules create (Istio's, or a previous Apply's).
	ErrAlreadyApplied = errors.New("istio chains already present")
	// ErrLeftover is returned by a cleanup that finds some of the rules'
	// chains still present after removing them.
	ErrLeftover = errors.New("istio chains left after cleanup")
)

// Options configures Apply.
type Options struct {
	// IPv6 also loads the ip6tables rules and adds ::6/128 to the loopback
	// interface, as istio-iptables does when IPv6 is enabled (a pod whose
	// first address is IPv6, or --dual-stack). Without it only the IPv4
	// rules are loaded and IPv6 traffic is not captured, as with Istio in a
	// dual-stack pod without ISTIO_DUAL_STACK.
	IPv6 bool
	// Runner runs the iptables and ip tools inside the namespace; nil means
	// NsenterRunner.
	Runner Runner
}

// Runner runs a program inside a network namespace.
type Runner interface {
	// Run runs the program name with args inside the network namespace at
	// netnsPath, with stdin as its standard input, and returns its standard
	// output. A failure to start or a nonzero exit is an error.
	Run(netnsPath, stdin, name string, args ...string) (stdout string, err error)
}

// NsenterRunner runs programs with "nsenter --net=PATH --", which enters only
// the network namespace and keeps the caller's mounts ("ip netns exec" would
// remount /sys).
type NsenterRunner struct{}

// Run implements Runner.
func (NsenterRunner) Run(netnsPath, stdin, name string, args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=" + netnsPath, "--", name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("nsenter --net=%s %s: %w: %s", netnsPath, strings.Join(append([]string{name}, args...), " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// tools are the nf_tables variants of the iptables programs, which Istio
// picks when no legacy rules exist.
type tools struct {
	restore, save, cli string
}

var familyTools = map[Family]tools{
	IPv4: {restore: "iptables-nft-restore", save: "iptables-nft-save", cli: "iptables-nft"},
	IPv6: {restore: "ip6tables-nft-restore", save: "ip6tables-nft-save", cli: "ip6tables-nft"},
}

// passthroughV6 is the source address of Envoy's inbound passthrough
// connections over IPv6, added to lo by istio-iptables.
const passthroughV6 = "::6/128"

// Apply loads Istio's sidecar rules (see Rules) into the network namespace
// bind-mounted at netnsPath (e.g. /run/netns/NAME or /proc/PID/ns/net): the
// IPv4 rules always, the IPv6 ones and the ::6 loopback address with
// opts.IPv6. It fails with ErrAlreadyApplied if one of the chains exists.
// If a step fails, what was already done is undone before returning.
//
// The returned cleanup removes exactly what Apply added: the rules appended
// to built-in chains, the chains it created, the built-in chains themselves
// if their table did not exist before (an empty nat chain still registers
// the nat hooks, and with them conntrack, in the namespace) and ::6 if it was
// not there. It then checks that none of the chains is left (ErrLeftover).
// Calling cleanup again returns the first call's result.
func Apply(netnsPath string, opts Options) (cleanup func() error, err error) {
	if netnsPath == "" {
		return nil, errors.New("apply istio iptables rules: empty network namespace path")
	}
	sets, err := parsedRules()
	if err != nil {
		return nil, fmt.Errorf("apply istio iptables rules: %w", err)
	}
	a := &applied{netns: netnsPath, run: opts.Runner}
	if a.run == nil {
		a.run = NsenterRunner{}
	}
	load := []Family{IPv4}
	if opts.IPv6 {
		load = append(load, IPv6)
	}
	for _, f := range load {
		if err := a.load(f, sets[f]); err != nil {
			return nil, a.rollback(fmt.Errorf("load istio %s rules into %s: %w", f, netnsPath, err))
		}
	}
	if opts.IPv6 {
		if err := a.addPassthroughV6(); err != nil {
			return nil, a.rollback(fmt.Errorf("add %s to lo in %s: %w", passthroughV6, netnsPath, err))
		}
	}
	return sync.OnceValue(a.undo), nil
}

// applied records what Apply did in one namespace, for undo.
type applied struct {
	netns string
	run   Runner
	// loaded are the families loaded, in order.
	loaded []loadedFamily
	// addedV6 tells whether Apply added ::6 to lo.
	addedV6 bool
}

type loadedFamily struct {
	family Family
	rules  *ruleSet
	// newTables are the tables that did not exist before the load.
	newTables []string
}

// load loads one family's rules with "iptables-restore --noflush", as
// istio-iptables does.
func (a *applied) load(f Family, rs *ruleSet) error {
	t := familyTools[f]
	before, err := a.run.Run(a.netns, "", t.save)
	if err != nil {
		return fmt.Errorf("read current rules: %w", err)
	}
	state := parseSave(before)
	var newTables []string
	for _, tb := range rs.tables {
		chains, ok := state[tb.name]
		if !ok {
			newTables = append(newTables, tb.name)
			continue
		}
		for _, c := range tb.chains {
			if chains[c] {
				return fmt.Errorf("%w: chain %s in table %s", ErrAlreadyApplied, c, tb.name)
			}
		}
	}
	if _, err := a.run.Run(a.netns, Rules(f), t.restore, "--noflush"); err != nil {
		return err
	}
	a.loaded = append(a.loaded, loadedFamily{family: f, rules: rs, newTables: newTables})
	return nil
}

func (a *applied) addPassthroughV6() error {
	out, err := a.run.Run(a.netns, "", "ip", "-6", "-o", "addr", "show", "dev", "lo")
	if err != nil {
		return err
	}
	if hasAddr(out, passthroughV6) {
		return nil
	}
	if _, err := a.run.Run(a.netns, "", "ip", "-6", "addr", "add", passthroughV6, "dev", "lo"); err != nil {
		return err
	}
	a.addedV6 = true
	return nil
}

// rollback undoes a partial Apply and returns err, with the undo's errors
// if any.
func (a *applied) rollback(err error) error {
	if uerr := a.undo(); uerr != nil {
		return multierror.Append(err, fmt.Errorf("roll back: %w", uerr))
	}
	return err
}

// undo removes what Apply added, in reverse order, going on after failures
// and returning all of them.
func (a *applied) undo() error {
	var result *multierror.Error
	if a.addedV6 {
		if _, err := a.run.Run(a.netns, "", "ip", "-6", "addr", "del", passthroughV6, "dev", "lo"); err != nil {
			result = multierror.Append(result, fmt.Errorf("remove %s from lo in %s: %w", passthroughV6, a.netns, err))
		} else {
			a.addedV6 = false
		}
	}
	for i := len(a.loaded) - 1; i >= 0; i-- {
		lf := a.loaded[i]
		if err := a.unload(lf); err != nil {
			result = multierror.Append(result, fmt.Errorf("remove istio %s rules from %s: %w", lf.family, a.netns, err))
			continue
		}
		a.loaded = slices.Delete(a.loaded, i, i+1)
	}
	return result.ErrorOrNil()
}

// unload removes one family's rules and checks that none of its chains is
// left.
func (a *applied) unload(lf loadedFamily) error {
	t := familyTools[lf.family]
	if _, err := a.run.Run(a.netns, lf.rules.cleanupInput(), t.restore, "--noflush"); err != nil {
		return err
	}
	var result *multierror.Error
	for _, tb := range lf.rules.tables {
		if !slices.Contains(lf.newTables, tb.name) {
			continue
		}
		// The table did not exist before: its built-in chains were created
		// by the restore. They are empty now, unless someone else added
		// rules meanwhile, in which case -X fails and they stay.
		for _, c := range tb.builtinChains() {
			if _, err := a.run.Run(a.netns, "", t.cli, "-t", tb.name, "-X", c); err != nil {
				result = multierror.Append(result, fmt.Errorf("delete built-in chain %s of table %s: %w", c, tb.name, err))
			}
		}
	}
	after, err := a.run.Run(a.netns, "", t.save)
	if err != nil {
		return multierror.Append(result, fmt.Errorf("read rules after cleanup: %w", err))
	}
	state := parseSave(after)
	for _, tb := range lf.rules.tables {
		for _, c := range tb.chains {
			if state[tb.name][c] {
				result = multierror.Append(result, fmt.Errorf("%w: chain %s in table %s", ErrLeftover, c, tb.name))
			}
		}
	}
	return result.ErrorOrNil()
}

// parseSave returns the tables in iptables-save output and, for each, the
// chains it declares (":CHAIN POLICY [packets:bytes]").
func parseSave(out string) map[string]map[string]bool {
	state := map[string]map[string]bool{}
	var cur map[string]bool
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "*"):
			cur = map[string]bool{}
			state[strings.TrimSpace(line[1:])] = cur
		case strings.HasPrefix(line, ":") && cur != nil:
			if name, _, _ := strings.Cut(line[1:], " "); name != "" {
				cur[name] = true
			}
		case line == "COMMIT":
			cur = nil
		}
	}
	return state
}

// hasAddr reports whether "ip -o addr show" output lists the address
// prefix addr.
func hasAddr(ipOutput, addr string) bool {
	for _, line := range strings.Split(ipOutput, "\n") {
		fields := strings.Fields(line)
		for i := 0; i+1 < len(fields); i++ {
			if (fields[i] == "inet" || fields[i] == "inet6") && fields[i+1] == addr {
				return true
			}
		}
	}
	return false
}

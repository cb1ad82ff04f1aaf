package baseline

import (
	"errors"
	"fmt"
)

// Present tells whether the network namespace at netnsPath holds the chains
// Apply would create with opts: all of them, or some of them (a partial
// load, or rules of someone else's that share Istio's chain names).
func Present(netnsPath string, opts Options) (all, some bool, err error) {
	if netnsPath == "" {
		return false, false, errors.New("look for istio iptables rules: empty network namespace path")
	}
	sets, err := parsedRules()
	if err != nil {
		return false, false, fmt.Errorf("look for istio iptables rules: %w", err)
	}
	run := opts.Runner
	if run == nil {
		run = NsenterRunner{}
	}
	load := []Family{IPv4}
	if opts.IPv6 {
		load = append(load, IPv6)
	}
	all = true
	for _, f := range load {
		out, err := run.Run(netnsPath, "", familyTools[f].save)
		if err != nil {
			return false, false, fmt.Errorf("read %s rules in %s: %w", f, netnsPath, err)
		}
		state := parseSave(out)
		for _, tb := range sets[f].tables {
			for _, c := range tb.chains {
				if state[tb.name][c] {
					some = true
				} else {
					all = false
				}
			}
		}
	}
	return all, some, nil
}

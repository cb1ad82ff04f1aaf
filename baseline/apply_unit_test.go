package baseline

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// fakeNS is a Runner that models one network namespace's nat tables and
// lo addresses well enough to drive Apply and its cleanup without root.
type fakeNS struct {
	calls []string
	// natExists and loaded are per save tool name.
	natExists map[string]bool
	loaded    map[string]bool
	v6Addr    bool
	// failOn makes the call whose "name args" starts with it fail.
	failOn string
	// stuck makes cleanup restores succeed without removing anything.
	stuck bool
}

func newFakeNS() *fakeNS {
	return &fakeNS{natExists: map[string]bool{}, loaded: map[string]bool{}}
}

func (f *fakeNS) Run(netnsPath, stdin, name string, args ...string) (string, error) {
	call := strings.Join(append([]string{name}, args...), " ")
	f.calls = append(f.calls, call)
	if netnsPath != "/run/netns/fake" {
		return "", fmt.Errorf("wrong netns %q", netnsPath)
	}
	if f.failOn != "" && strings.HasPrefix(call, f.failOn) {
		return "", fmt.Errorf("%s: injected failure", call)
	}
	// save names the table state a restore or iptables-nft call changes.
	save := name
	if strings.HasSuffix(name, "-restore") {
		save = strings.TrimSuffix(name, "-restore") + "-save"
	} else if strings.HasSuffix(name, "tables-nft") {
		save = name + "-save"
	}
	switch {
	case call == "iptables-nft-save" || call == "ip6tables-nft-save":
		if !f.natExists[name] {
			return "", nil
		}
		out := "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
		if f.loaded[name] {
			out += ":ISTIO_INBOUND - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n"
		}
		return out + "COMMIT\n", nil
	case strings.HasSuffix(name, "-restore") && slices.Equal(args, []string{"--noflush"}):
		family := IPv4
		if strings.HasPrefix(name, "ip6") {
			family = IPv6
		}
		switch {
		case stdin == Rules(family):
			if f.loaded[save] {
				return "", errors.New("chain already exists")
			}
			f.loaded[save] = true
			f.natExists[save] = true
		case strings.Contains(stdin, "-X ISTIO_OUTPUT"):
			if !f.loaded[save] {
				return "", errors.New("no chain by that name")
			}
			if !f.stuck {
				f.loaded[save] = false
			}
		default:
			return "", fmt.Errorf("unexpected restore input:\n%s", stdin)
		}
		return "", nil
	case strings.HasSuffix(name, "tables-nft") && len(args) == 4 && args[2] == "-X":
		return "", nil
	case call == "ip -6 -o addr show dev lo":
		out := "1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever\n"
		if f.v6Addr {
			out += "1: lo    inet6 ::6/128 scope global \\       valid_lft forever preferred_lft forever\n"
		}
		return out, nil
	case call == "ip -6 addr add ::6/128 dev lo":
		f.v6Addr = true
		return "", nil
	case call == "ip -6 addr del ::6/128 dev lo":
		f.v6Addr = false
		return "", nil
	}
	return "", fmt.Errorf("unexpected call %q", call)
}

func TestApplyFake(t *testing.T) {
	applyV4 := []string{"iptables-nft-save", "iptables-nft-restore --noflush"}
	applyV6 := []string{"ip6tables-nft-save", "ip6tables-nft-restore --noflush", "ip -6 -o addr show dev lo"}
	cleanV4 := []string{"iptables-nft-restore --noflush", "iptables-nft -t nat -X PREROUTING", "iptables-nft -t nat -X OUTPUT", "iptables-nft-save"}
	cleanV6 := []string{"ip6tables-nft-restore --noflush", "ip6tables-nft -t nat -X PREROUTING", "ip6tables-nft -t nat -X OUTPUT", "ip6tables-nft-save"}
	cat := func(parts ...[]string) []string { return slices.Concat(parts...) }

	for _, tc := range []struct {
		name       string
		ipv6       bool
		setup      func(f *fakeNS)
		wantApply  []string
		wantErr    error  // from Apply
		wantErrStr string // in Apply's error
		wantClean  []string
		cleanErr   error
	}{
		{
			name:      "ipv4",
			wantApply: applyV4,
			wantClean: cleanV4,
		},
		{
			name:      "dual-stack",
			ipv6:      true,
			wantApply: cat(applyV4, applyV6, []string{"ip -6 addr add ::6/128 dev lo"}),
			wantClean: cat([]string{"ip -6 addr del ::6/128 dev lo"}, cleanV6, cleanV4),
		},
		{
			name:      "::6 already on lo is left alone",
			ipv6:      true,
			setup:     func(f *fakeNS) { f.v6Addr = true },
			wantApply: cat(applyV4, applyV6),
			wantClean: cat(cleanV6, cleanV4),
		},
		{
			name:      "existing nat table keeps its built-in chains",
			setup:     func(f *fakeNS) { f.natExists["iptables-nft-save"] = true },
			wantApply: applyV4,
			wantClean: []string{"iptables-nft-restore --noflush", "iptables-nft-save"},
		},
		{
			name: "already applied",
			setup: func(f *fakeNS) {
				f.natExists["iptables-nft-save"] = true
				f.loaded["iptables-nft-save"] = true
			},
			wantApply: []string{"iptables-nft-save"},
			wantErr:   ErrAlreadyApplied,
		},
		{
			name:       "ipv6 failure rolls back ipv4",
			ipv6:       true,
			setup:      func(f *fakeNS) { f.failOn = "ip6tables-nft-restore" },
			wantApply:  cat(applyV4, []string{"ip6tables-nft-save", "ip6tables-nft-restore --noflush"}, cleanV4),
			wantErrStr: "load istio IPv6 rules into /run/netns/fake",
		},
		{
			name:       "::6 failure rolls back both",
			ipv6:       true,
			setup:      func(f *fakeNS) { f.failOn = "ip -6 addr add" },
			wantApply:  cat(applyV4, applyV6, []string{"ip -6 addr add ::6/128 dev lo"}, cleanV6, cleanV4),
			wantErrStr: "add ::6/128 to lo in /run/netns/fake",
		},
		{
			name:      "leftover chains",
			setup:     func(f *fakeNS) { f.stuck = true },
			wantApply: applyV4,
			wantClean: cleanV4,
			cleanErr:  ErrLeftover,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeNS()
			if tc.setup != nil {
				tc.setup(f)
			}
			cleanup, err := Apply("/run/netns/fake", Options{IPv6: tc.ipv6, Runner: f})
			if !slices.Equal(f.calls, tc.wantApply) {
				t.Errorf("Apply calls:\n%s\nwant:\n%s", strings.Join(f.calls, "\n"), strings.Join(tc.wantApply, "\n"))
			}
			if tc.wantErr != nil || tc.wantErrStr != "" {
				if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) || !strings.Contains(err.Error(), tc.wantErrStr) {
					t.Fatalf("Apply error %v, want %v %q", err, tc.wantErr, tc.wantErrStr)
				}
				if f.loaded["iptables-nft-save"] && tc.wantErr == nil || f.loaded["ip6tables-nft-save"] || f.v6Addr {
					t.Errorf("failed Apply left state behind: %+v", f)
				}
				return
			}
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			f.calls = nil
			err = cleanup()
			if !errors.Is(err, tc.cleanErr) || (tc.cleanErr == nil) != (err == nil) {
				t.Errorf("cleanup error %v, want %v", err, tc.cleanErr)
			}
			if !slices.Equal(f.calls, tc.wantClean) {
				t.Errorf("cleanup calls:\n%s\nwant:\n%s", strings.Join(f.calls, "\n"), strings.Join(tc.wantClean, "\n"))
			}
			if tc.cleanErr == nil && (f.loaded["iptables-nft-save"] || f.loaded["ip6tables-nft-save"] || (f.v6Addr && tc.setup == nil)) {
				t.Errorf("cleanup left state behind: %+v", f)
			}
			f.calls = nil
			if err2 := cleanup(); !errors.Is(err2, tc.cleanErr) || len(f.calls) != 0 {
				t.Errorf("second cleanup: %v after calls %q, want the first result and no calls", err2, f.calls)
			}
		})
	}
}

func TestApplyEmptyPath(t *testing.T) {
	if _, err := Apply("", Options{Runner: newFakeNS()}); err == nil {
		t.Fatal("Apply with an empty path succeeded")
	}
}

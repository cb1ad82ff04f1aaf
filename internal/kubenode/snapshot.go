package kubenode

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Snapshot is the host state a node touches.
type Snapshot struct {
	Sysctls   map[string]string
	LoAddrs   string   // ip -o addr show dev lo
	Links     []string // link names
	Iptables  string   // iptables-save and ip6tables-save, rules and chains only
	NftTables []string // nft list tables
	Fixed     map[string]bool
	Cgroups   map[string]bool // hierarchy/NAME for cgroupNames
	Mounts    map[string]bool // mount points
}

// TakeSnapshot records the host state.
func TakeSnapshot() (*Snapshot, error) {
	s := &Snapshot{Sysctls: map[string]string{}, Fixed: map[string]bool{}, Cgroups: map[string]bool{}, Mounts: map[string]bool{}}
	for _, k := range sysctls {
		b, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/")))
		if err != nil {
			return nil, fmt.Errorf("sysctl %s: %w", k, err)
		}
		s.Sysctls[k] = strings.TrimSpace(string(b))
	}
	out, err := exec.Command("ip", "-o", "addr", "show", "dev", "lo").Output()
	if err != nil {
		return nil, fmt.Errorf("ip addr show dev lo: %w", err)
	}
	s.LoAddrs = string(out)
	out, err = exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		return nil, fmt.Errorf("ip link show: %w", err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			s.Links = append(s.Links, strings.TrimSuffix(strings.SplitN(f[1], "@", 2)[0], ":"))
		}
	}
	sort.Strings(s.Links)
	var ipt strings.Builder
	for _, prog := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(prog).Output()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", prog, err)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "-A") || strings.HasPrefix(l, ":") || strings.HasPrefix(l, "*") {
				if strings.HasPrefix(l, ":") { // chain policy counters change
					l = strings.Fields(l)[0]
				}
				ipt.WriteString(l + "\n")
			}
		}
	}
	s.Iptables = ipt.String()
	out, err = exec.Command("nft", "list", "tables").Output()
	if err != nil {
		return nil, fmt.Errorf("nft list tables: %w", err)
	}
	s.NftTables = nonEmptyLines(string(out))
	for _, d := range fixedDirs {
		if _, err := os.Lstat(d); err == nil {
			s.Fixed[d] = true
		}
	}
	for _, root := range cgroupRoots() {
		for _, name := range cgroupNames {
			if _, err := os.Stat(filepath.Join(root, name)); err == nil {
				s.Cgroups[filepath.Join(root, name)] = true
			}
		}
	}
	mounts, err := mountPoints()
	if err != nil {
		return nil, err
	}
	for _, m := range mounts {
		s.Mounts[m] = true
	}
	return s, nil
}

func nonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	sort.Strings(out)
	return out
}

// restore puts back what the snapshot recorded and a node changes:
// sysctls, the fixed directories (removed if they were not there; else
// only the CNI results of NetworkName), and nft tables that are new and
// empty (iptables-nft leaves empty tables behind).
func (s *Snapshot) restore() error {
	var errs []string
	for k, v := range s.Sysctls {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if b, _ := os.ReadFile(p); strings.TrimSpace(string(b)) == v {
			continue
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Sprintf("sysctl %s=%s: %v", k, v, err))
		}
	}
	for _, d := range fixedDirs {
		if !s.Fixed[d] {
			if err := os.RemoveAll(d); err != nil {
				errs = append(errs, err.Error())
			}
		}
	}
	if s.Fixed["/var/lib/cni"] {
		for _, f := range mustGlob("/var/lib/cni/results/" + NetworkName + "-*") {
			id := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(f), NetworkName+"-"), "-eth0")
			os.Remove(f)
			os.Remove("/var/lib/cni/results/cni-loopback-" + id + "-lo")
		}
	}
	out, _ := exec.Command("nft", "list", "tables").Output()
	had := map[string]bool{}
	for _, t := range s.NftTables {
		had[t] = true
	}
	for _, t := range nonEmptyLines(string(out)) {
		f := strings.Fields(t) // table FAMILY NAME
		if had[t] || len(f) != 3 {
			continue
		}
		body, err := exec.Command("nft", "list", "table", f[1], f[2]).Output()
		if err != nil {
			continue
		}
		empty := true
		for _, l := range nonEmptyLines(string(body)) {
			if !strings.HasPrefix(l, "table") && !strings.HasPrefix(l, "chain") && !strings.HasPrefix(l, "type") && l != "}" {
				empty = false
			}
		}
		if empty {
			if out, err := exec.Command("nft", "delete", "table", f[1], f[2]).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Sprintf("nft delete table %s %s: %v: %s", f[1], f[2], err, out))
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("restore: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Diff lists how the host differs from s. Mounts are compared only under
// the node's fixed paths and /run/netns/cni-* (other programs of the
// machine mount and unmount meanwhile).
func (s *Snapshot) Diff(now *Snapshot) []string {
	var d []string
	for k, v := range s.Sysctls {
		if now.Sysctls[k] != v {
			d = append(d, fmt.Sprintf("sysctl %s: %s, was %s", k, now.Sysctls[k], v))
		}
	}
	if now.LoAddrs != s.LoAddrs {
		d = append(d, fmt.Sprintf("lo's addresses: %q, were %q", now.LoAddrs, s.LoAddrs))
	}
	had := map[string]bool{}
	for _, l := range s.Links {
		had[l] = true
	}
	for _, l := range now.Links {
		// Other programs of the machine add links meanwhile: only the
		// node's bridge and its pods' veths count.
		if !had[l] && (l == Bridge || strings.HasPrefix(l, "veth")) {
			d = append(d, "link "+l+" left")
		}
	}
	if now.Iptables != s.Iptables {
		d = append(d, fmt.Sprintf("iptables: %q, was %q", now.Iptables, s.Iptables))
	}
	if a, b := strings.Join(now.NftTables, ", "), strings.Join(s.NftTables, ", "); a != b {
		d = append(d, fmt.Sprintf("nft tables: %s, were %s", a, b))
	}
	for _, f := range fixedDirs {
		if now.Fixed[f] != s.Fixed[f] {
			d = append(d, fmt.Sprintf("%s exists: %v, was %v", f, now.Fixed[f], s.Fixed[f]))
		}
	}
	for c := range now.Cgroups {
		if !s.Cgroups[c] {
			d = append(d, "cgroup "+c+" left")
		}
	}
	for m := range now.Mounts {
		if !s.Mounts[m] && (strings.HasPrefix(m, "/run/netns/cni-") || strings.HasPrefix(m, "/var/lib/kubelet") ||
			strings.HasPrefix(m, "/run/containerd") || strings.HasPrefix(m, filepath.Join(os.TempDir(), "mstest-node-"))) {
			d = append(d, "mount "+m+" left")
		}
	}
	sort.Strings(d)
	return d
}

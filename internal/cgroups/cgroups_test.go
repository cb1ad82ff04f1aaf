package cgroups

import (
	"errors"
	"strings"
	"syscall"
	"testing"
)

func TestParseMount(t *testing.T) {
	const hybrid = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/my\040unified rw,relatime shared:10 master:3 - cgroup2 cgroup2 rw
`
	got, err := parseMount(strings.NewReader(hybrid))
	if err != nil || got != "/sys/fs/cgroup/my unified" {
		t.Fatalf("got %q, %v", got, err)
	}
	const none = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
	if got, err := parseMount(strings.NewReader(none)); err == nil {
		t.Fatalf("no cgroup2 mount: got %q, want error", got)
	}
}

func TestParseMounts(t *testing.T) {
	const info = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
50 23 0:45 / /sys/fs/bpf rw,relatime shared:20 - bpf bpf rw
51 23 0:46 / /run/my\040bpf rw,relatime - bpf none rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 master:3 - cgroup2 cgroup2 rw
`
	for _, tc := range []struct {
		fstype string
		want   []string
	}{
		{"bpf", []string{"/sys/fs/bpf", "/run/my bpf"}},
		{"cgroup2", []string{"/sys/fs/cgroup/unified"}},
		{"ext4", nil},
	} {
		got, err := parseMounts(strings.NewReader(info), tc.fstype)
		if err != nil || strings.Join(got, "|") != strings.Join(tc.want, "|") {
			t.Errorf("%s: got %q, %v; want %q", tc.fstype, got, err, tc.want)
		}
	}
}

func TestPathByID(t *testing.T) {
	root, err := Mount()
	if err != nil {
		t.Skipf("no cgroup v2 mount: %v", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(root, &st); err != nil {
		t.Fatal(err)
	}
	if got, err := PathByID(st.Ino); err != nil || got != root {
		t.Fatalf("PathByID(root's id %d) = %q, %v; want %q", st.Ino, got, err, root)
	}
	if _, err := PathByID(0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("PathByID(0): %v, want ErrNotFound", err)
	}
}

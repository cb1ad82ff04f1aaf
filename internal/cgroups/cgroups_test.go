package cgroups

import (
	"strings"
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

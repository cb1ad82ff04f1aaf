package testnet

import (
	"strings"
	"testing"
)

func TestParseCgroup2Mount(t *testing.T) {
	const hybrid = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/my\040unified rw,relatime shared:10 master:3 - cgroup2 cgroup2 rw
`
	got, err := parseCgroup2Mount(strings.NewReader(hybrid))
	if err != nil || got != "/sys/fs/cgroup/my unified" {
		t.Fatalf("got %q, %v", got, err)
	}
	const none = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
	if got, err := parseCgroup2Mount(strings.NewReader(none)); err == nil {
		t.Fatalf("no cgroup2 mount: got %q, want error", got)
	}
}

func TestV6Addr(t *testing.T) {
	if got := v6Addr(150, 7).String(); got != "fd00:150::7" {
		t.Fatalf("v6Addr(150, 7) = %s", got)
	}
	if got := v6Addr(150, 200, 1).String(); got != "fd00:150:200::1" {
		t.Fatalf("v6Addr(150, 200, 1) = %s", got)
	}
}

func TestLineWriter(t *testing.T) {
	var lines []string
	w := &lineWriter{fn: func(s string) { lines = append(lines, s) }}
	for _, chunk := range []string{"a", "b\nc\r\n", "\nd"} {
		if _, err := w.Write([]byte(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	w.flush()
	if strings.Join(lines, "|") != "ab|c||d" {
		t.Fatalf("lines %q", lines)
	}
}

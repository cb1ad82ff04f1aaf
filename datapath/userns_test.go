package datapath

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMapID(t *testing.T) {
	const m = "         0     100000      65536\n    100000     300000         10\n"
	path := filepath.Join(t.TempDir(), "uid_map")
	if err := os.WriteFile(path, []byte(m), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id, want uint32
	}{
		{0, 100000},
		{1337, 101337},
		{65535, 165535},
		{65536, unmappedID}, // outside every extent: matches no process
		{100009, 300009},
		{100010, unmappedID},
	} {
		got, err := mapID(path, tc.id)
		if err != nil || got != tc.want {
			t.Errorf("mapID(%d) = %d, %v; want %d", tc.id, got, err, tc.want)
		}
	}
}

func TestProxyIDsOnHostInTheHostUserNamespace(t *testing.T) {
	uid, gid, err := proxyIDsOnHost("/proc/self/ns/net", 1337, 1338)
	if err != nil || uid != 1337 || gid != 1338 {
		t.Fatalf("proxyIDsOnHost = %d, %d, %v; want 1337, 1338 unchanged", uid, gid, err)
	}
}

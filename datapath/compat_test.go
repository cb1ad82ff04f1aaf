package datapath_test

import (
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/redirect"
)

// TestOpenRefusesAnotherMapLayout: maps pinned by a version with another
// layout (here: ms_socks and ms_counters of other sizes, as an older or
// newer meshsplice would leave them) make Open refuse before it loads,
// creates or attaches anything, naming every map that differs and the way
// out.
func TestOpenRefusesAnotherMapLayout(t *testing.T) {
	testnet.RequireRoot(t)
	cg := testnet.NewCgroup(t)
	pin := testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, 0) })
	maps := filepath.Join(pin, "maps")
	if err := os.MkdirAll(maps, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, spec := range []*ebpf.MapSpec{
		{Name: "ms_socks", Type: ebpf.SockHash, KeySize: 8, ValueSize: 8, MaxEntries: 16},
		{Name: "ms_counters", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 3},
	} {
		m, err := ebpf.NewMap(spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Pin(filepath.Join(maps, spec.Name)); err != nil {
			t.Fatal(err)
		}
		m.Close()
	}

	_, err := datapath.Open(datapath.Options{PinDir: pin, CgroupPath: cg.Path, Node: datapath.NodeSettings{Capture: true, Splice: true}})
	if !errors.Is(err, datapath.ErrIncompatiblePins) {
		t.Fatalf("Open over another layout: %v, want ErrIncompatiblePins", err)
	}
	for _, want := range []string{"ms_socks (KeySize", "ms_counters (MaxEntries: 3 changed to", "meshsplice uninstall --pin-dir " + pin} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal does not say %q: %v", want, err)
		}
	}
	entries, _ := os.ReadDir(maps)
	if len(entries) != 2 {
		t.Errorf("Open pinned maps before refusing: %d in %s, want the 2 there before", len(entries), maps)
	}
	if _, err := os.Stat(filepath.Join(pin, "links")); err == nil {
		if l, _ := os.ReadDir(filepath.Join(pin, "links")); len(l) > 1 { // netns/ is made by Open
			t.Errorf("Open left links: %v", l)
		}
	}
	if n := attachedPrograms(t, cg.Path); n != 0 {
		t.Errorf("programs attached by a refused Open: %d", n)
	}
}

// TestOpenRefusesAnotherStructLayout: a pinned map whose key has this
// version's size but other fields (a struct changed without growing) is
// refused too: its BTF is compared member by member.
func TestOpenRefusesAnotherStructLayout(t *testing.T) {
	testnet.RequireRoot(t)
	cg := testnet.NewCgroup(t)
	pin := testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, 0) })
	spec, err := redirect.LoadCapture()
	if err != nil {
		t.Fatal(err)
	}
	var old *ebpf.MapSpec
	for _, name := range slices.Sorted(maps.Keys(spec.Maps)) {
		ms := spec.Maps[name]
		if _, ok := btf.UnderlyingType(ms.Key).(*btf.Struct); ok && ms.Type == ebpf.Hash && ms.Pinning == ebpf.PinByName {
			old = ms.Copy()
			break
		}
	}
	if old == nil {
		t.Fatal("no hash map with a struct key")
	}
	key := btf.UnderlyingType(old.Key).(*btf.Struct)
	old.Key = &btf.Struct{Name: key.Name, Size: key.Size, Members: []btf.Member{
		{Name: "old_field", Type: &btf.Array{Type: &btf.Int{Name: "char", Size: 1}, Index: &btf.Int{Name: "int", Size: 4}, Nelems: key.Size}},
	}}
	old.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(old)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := os.MkdirAll(filepath.Join(pin, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(pin, "maps", old.Name)); err != nil {
		t.Fatal(err)
	}

	_, err = datapath.Open(datapath.Options{PinDir: pin, CgroupPath: cg.Path})
	if !errors.Is(err, datapath.ErrIncompatiblePins) || !strings.Contains(err.Error(), old.Name+" (key layout struct") {
		t.Fatalf("Open over a %s whose key has other fields: %v, want ErrIncompatiblePins naming its key layout", old.Name, err)
	}
	t.Log(err)
	if n := attachedPrograms(t, cg.Path); n != 0 {
		t.Errorf("programs attached by a refused Open: %d", n)
	}
}

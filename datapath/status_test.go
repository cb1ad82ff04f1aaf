package datapath_test

import (
	"os"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/dptest"
)

// TestStatusLinksTellTheTruth: status reports every link as the kernel
// sees it: attached, with the program the kernel runs on that hook.
func TestStatusLinksTellTheTruth(t *testing.T) {
	a := dptest.Attach(t)
	cg, pin, ns, cookie := a.Cgroup, a.PinDir, a.Pod, a.Cookie
	st, err := datapath.Inspect(pin)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		target  string
		attach  ebpf.AttachType
		program string
	}{
		"sockops":    {cg.Path, ebpf.AttachCGroupSockOps, "ms_sockops"},
		"getsockopt": {cg.Path, ebpf.AttachCGroupGetsockopt, "ms_getsockopt"},
		"connect4":   {cg.Path, ebpf.AttachCGroupInet4Connect, "ms_connect4"},
		"connect6":   {cg.Path, ebpf.AttachCGroupInet6Connect, "ms_connect6"},
		"netns/" + strconv.FormatUint(cookie, 10): {ns.Path(), ebpf.AttachSkLookup, "ms_sk_lookup"},
	}
	// The splice(2) reader links (readers.go): the guard's three, or the
	// detector, whichever this kernel gets.
	readers := map[string]string{"splice-enter": "ms_splice_enter", "splice-exit": "ms_splice_exit",
		"splice-guard": "ms_splice_guard", "splice-detect": "ms_splice_detect"}
	links := st.Links[:0:0]
	for _, l := range st.Links {
		if prog, ok := readers[l.Name]; ok {
			if !l.Attached || l.Error != "" || l.Program != prog || l.LinkID == 0 {
				t.Errorf("reader link %s: %+v", l.Name, l)
			}
			continue
		}
		links = append(links, l)
	}
	st.Links = links
	if len(st.Links) != len(want) {
		t.Fatalf("status has %d links, want %d: %+v", len(st.Links), len(want), st.Links)
	}
	for _, l := range st.Links {
		w, ok := want[l.Name]
		if !ok {
			t.Errorf("unexpected link %+v", l)
			continue
		}
		kernel := dptest.Programs(t, w.target, w.attach)
		if len(kernel) != 1 {
			t.Fatalf("kernel has %v on %s for %s", kernel, w.target, w.attach)
		}
		if !l.Attached || l.Error != "" || l.ProgramID != uint32(kernel[0]) || l.Program != w.program || l.LinkID == 0 {
			t.Errorf("link %s: %+v, kernel runs program %d (%s) there", l.Name, l, kernel[0], w.program)
		}
		if w.target == cg.Path && l.Target != cg.Path {
			t.Errorf("link %s target %q, want %q", l.Name, l.Target, cg.Path)
		}
	}
	if len(st.Problems) != 0 {
		t.Errorf("problems: %v", st.Problems)
	}
}

// TestStatusSaysWhatItCannotRead: an unreadable pin is a problem named in
// the status, not a silent "not attached".
func TestStatusSaysWhatItCannotRead(t *testing.T) {
	pin := dptest.Attach(t).PinDir
	bogus := pin + "/links/netns/12345"
	// A pinned map where a link is expected: the kernel refuses to open it
	// as a link.
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(bogus); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(bogus) })
	st, err := datapath.Inspect(pin)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range st.Links {
		if l.Name == "netns/12345" {
			found = true
			if l.Attached || l.Error == "" {
				t.Errorf("unreadable link reported as %+v", l)
			}
		}
	}
	if !found || len(st.Problems) == 0 {
		t.Errorf("status hides the unreadable pin: links %+v, problems %v", st.Links, st.Problems)
	}
}

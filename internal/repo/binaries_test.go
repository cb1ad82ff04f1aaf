package repo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// emBPF is ELF's e_machine for BPF; etRel a relocatable object.
const (
	emBPF = 247
	etRel = 1
)

// compiledKind says what compiled program a file's first bytes show, or ""
// for anything else. A BPF relocatable object (bpf2go's *_bpfel.o, which
// is committed on purpose so a build needs no clang) is not one.
func compiledKind(head []byte) string {
	switch {
	case len(head) >= 20 && bytes.HasPrefix(head, []byte("\x7fELF")):
		typ := binary.LittleEndian.Uint16(head[16:])
		machine := binary.LittleEndian.Uint16(head[18:])
		if head[5] == 2 { // big-endian ELF
			typ = binary.BigEndian.Uint16(head[16:])
			machine = binary.BigEndian.Uint16(head[18:])
		}
		if machine == emBPF && typ == etRel {
			return ""
		}
		return "ELF"
	case bytes.HasPrefix(head, []byte("\x7fELF")):
		return "ELF"
	case bytes.HasPrefix(head, []byte("!<arch>\n")):
		return "ar archive"
	case bytes.HasPrefix(head, []byte{0xcf, 0xfa, 0xed, 0xfe}), bytes.HasPrefix(head, []byte{0xce, 0xfa, 0xed, 0xfe}):
		return "Mach-O"
	case bytes.HasPrefix(head, []byte("MZ")) && len(head) >= 64:
		return "PE"
	}
	return ""
}

func TestCompiledKind(t *testing.T) {
	elf := func(class byte, typ, machine uint16) []byte {
		h := make([]byte, 64)
		copy(h, "\x7fELF")
		h[4], h[5] = class, 1
		binary.LittleEndian.PutUint16(h[16:], typ)
		binary.LittleEndian.PutUint16(h[18:], machine)
		return h
	}
	self, err := os.Executable() // this test binary: an ELF executable
	if err != nil {
		t.Fatal(err)
	}
	selfHead := readHead(t, self)
	for _, tc := range []struct {
		name string
		head []byte
		want string
	}{
		{"this test binary", selfHead, "ELF"},
		{"x86-64 executable", elf(2, 2, 62), "ELF"},
		{"x86-64 shared object", elf(2, 3, 62), "ELF"},
		{"x86-64 object", elf(2, 1, 62), "ELF"},
		{"bpf2go object", elf(2, etRel, emBPF), ""},
		{"BPF executable", elf(2, 2, emBPF), "ELF"},
		{"truncated ELF", []byte("\x7fELF\x02"), "ELF"},
		{"static library", []byte("!<arch>\nfoo"), "ar archive"},
		{"Go source", []byte("package repo\n"), ""},
		{"empty", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := compiledKind(tc.head); got != tc.want {
				t.Errorf("compiledKind = %q, want %q", got, tc.want)
			}
		})
	}
}

func readHead(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := make([]byte, 64)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return head[:n]
}

// tracked returns the module root and the files git tracks there; it skips
// the test outside a git checkout.
func tracked(t *testing.T) (root string, files []string) {
	t.Helper()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	files, err = TrackedFiles(root)
	if errors.Is(err, ErrNotGit) {
		t.Skipf("%s: %v", root, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return root, files
}

// TestNoCompiledBinaries fails when git tracks a compiled program: a clone
// carries sources only (built programs go to bin/, see .gitignore). The
// committed BPF objects are the one exception, by design.
func TestNoCompiledBinaries(t *testing.T) {
	root, files := tracked(t)
	for _, f := range files {
		path := filepath.Join(root, f)
		if st, err := os.Lstat(path); err != nil || !st.Mode().IsRegular() {
			continue // deleted in the work tree, or a link
		}
		if kind := compiledKind(readHead(t, path)); kind != "" {
			t.Errorf("git tracks %s, a compiled program (%s): git rm --cached it and let .gitignore keep it out", f, kind)
		}
	}
}

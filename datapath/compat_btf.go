package datapath

import (
	"fmt"
	"strings"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// layoutDiff compares the BTF key and value types of a pinned map with
// the spec's, member by member (names, offsets, sizes): a struct whose
// fields changed while its size stayed would otherwise be reused and
// misread. It returns "" when they agree or when either side has no BTF
// to compare (nothing is known then: MapSpec.Compatible judged the sizes).
func layoutDiff(ms *ebpf.MapSpec, m *ebpf.Map) string {
	if ms.Key == nil && ms.Value == nil {
		return ""
	}
	btfID, keyID, valueID, err := mapBTFIDs(m)
	if err != nil || btfID == 0 {
		return ""
	}
	h, err := btf.NewHandleFromID(btf.ID(btfID))
	if err != nil {
		return ""
	}
	defer h.Close()
	spec, err := h.Spec(nil)
	if err != nil {
		return ""
	}
	var diffs []string
	for _, c := range []struct {
		what string
		want btf.Type
		id   uint32
	}{{"key", ms.Key, keyID}, {"value", ms.Value, valueID}} {
		if c.want == nil || c.id == 0 {
			continue
		}
		got, err := spec.TypeByID(btf.TypeID(c.id))
		if err != nil {
			continue
		}
		if g, w := layout(got), layout(c.want); g != w {
			diffs = append(diffs, fmt.Sprintf("%s layout %s changed to %s", c.what, g, w))
		}
	}
	return strings.Join(diffs, ", ")
}

// mapBTFIDs reads the BTF object and the key and value type IDs of a map
// (struct bpf_map_info; cilium/ebpf's MapInfo has the object ID only).
func mapBTFIDs(m *ebpf.Map) (btfID, keyID, valueID uint32, err error) {
	var info [88]byte // struct bpf_map_info up to map_extra
	attr := struct {
		fd      uint32
		infoLen uint32
		info    uint64
	}{uint32(m.FD()), uint32(len(info)), uint64(uintptr(unsafe.Pointer(&info[0])))}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET_INFO_BY_FD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return 0, 0, 0, errno
	}
	u32 := func(off int) uint32 { return *(*uint32)(unsafe.Pointer(&info[off])) }
	return u32(64), u32(68), u32(72), nil
}

// layout renders a type as its memory layout: sizes, offsets and member
// names, through typedefs and qualifiers; type names are left out (a
// renamed struct is the same layout).
func layout(t btf.Type) string {
	var b strings.Builder
	writeLayout(&b, t, 0)
	return b.String()
}

func writeLayout(b *strings.Builder, t btf.Type, depth int) {
	if depth > 16 {
		b.WriteString("...")
		return
	}
	switch t := btf.UnderlyingType(t).(type) {
	case *btf.Struct:
		writeMembers(b, "struct", t.Size, t.Members, depth)
	case *btf.Union:
		writeMembers(b, "union", t.Size, t.Members, depth)
	case *btf.Int:
		fmt.Fprintf(b, "int%d", t.Size*8)
		if t.Encoding&btf.Signed != 0 {
			b.WriteString("s")
		}
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", t.Nelems)
		writeLayout(b, t.Type, depth+1)
	case *btf.Enum:
		fmt.Fprintf(b, "enum%d", t.Size*8)
	case *btf.Pointer:
		b.WriteString("ptr")
	default:
		fmt.Fprintf(b, "%T", t)
	}
}

func writeMembers(b *strings.Builder, kind string, size uint32, members []btf.Member, depth int) {
	fmt.Fprintf(b, "%s%d{", kind, size)
	for i, m := range members {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(b, "%s@%d", m.Name, m.Offset)
		if m.BitfieldSize != 0 {
			fmt.Fprintf(b, ":%d", m.BitfieldSize)
		}
		b.WriteString("=")
		writeLayout(b, m.Type, depth+1)
	}
	b.WriteString("}")
}

//go:build meshsplice_variant

package datapath

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
)

// This file is compiled only into the e2e tests' second agent build
// (-tags meshsplice_variant): a datapath that differs from this version's
// as the next release's would.
//
//   - variant "program" (the default): every program starts with one more
//     instruction, so each has a new tag; maps are unchanged. Upgrading to
//     it, and back, updates the links in place.
//   - variant "maps" (-ldflags "-X .../datapath.variant=maps"): ms_counters
//     has twice the entries (as when a release adds counters), an
//     incompatible map layout: Open refuses pins of this version's.
var variant = "program"

func init() { specHook = variantSpec }

func variantSpec(spec *ebpf.CollectionSpec) {
	if variant == "maps" {
		if m := spec.Maps["ms_counters"]; m != nil {
			m.MaxEntries *= 2
		}
		return
	}
	for _, p := range spec.Programs {
		// r0 = 0 before the entry instruction, which hands its symbol,
		// function and line info (not its CO-RE relocation or map
		// reference) to the new first instruction. Jumps are relative and
		// calls symbolic: nothing else moves.
		orig := p.Instructions[0]
		first := asm.Mov.Imm(asm.R0, 0).WithSymbol(orig.Symbol()).WithSource(orig.Source())
		first = btf.WithFuncMetadata(first, btf.FuncMetadata(&orig))
		p.Instructions[0] = btf.WithFuncMetadata(orig.WithSymbol("").WithSource(nil), nil)
		p.Instructions = append(asm.Instructions{first}, p.Instructions...)
	}
}

package policy

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"sync"
)

// IdentityID is the small number the kernel knows a workload identity by.
// UnknownIdentity (0) is a source that is not a known pod.
type IdentityID uint32

// UnknownIdentity is the identity of a source address that belongs to no
// known workload. Its certificate is unknown: identity conditions never
// deny it, address and port conditions still can (see the package
// documentation, "Unknown sources").
const UnknownIdentity IdentityID = 0

// Identities hands out the IdentityID of a SPIFFE ID. Compile calls ID for
// the identity of every workload in its input; an implementation must
// never return UnknownIdentity for a non-empty ID, nor the same number for
// two IDs. Allocator is the implementation meshsplice uses.
type Identities interface {
	ID(spiffe string) IdentityID
}

// ErrBadState is wrapped by Allocator.Load when the saved state is not
// usable.
var ErrBadState = errors.New("bad identity allocator state")

// Allocator gives each SPIFFE ID a stable IdentityID: numbers start at 1, an
// identity keeps its number for as long as the allocator knows it (and across
// restarts, through Save and Load), and a number is never handed to another
// identity while the allocator still knows the first. Numbers of forgotten
// identities (Retain) are not reused either until the 32-bit space runs out,
// so that a stale kernel entry can never name a newer identity.
//
// An Allocator is safe for concurrent use.
type Allocator struct {
	mu    sync.Mutex
	ids   map[string]IdentityID
	names map[IdentityID]string
	next  uint64 // next number to try; > math.MaxUint32 once the space wrapped
}

// NewAllocator returns an empty Allocator.
func NewAllocator() *Allocator {
	return &Allocator{ids: map[string]IdentityID{}, names: map[IdentityID]string{}, next: 1}
}

// ID returns the number of spiffe, allocating one if spiffe is new. The
// empty string is the unknown source: UnknownIdentity.
func (a *Allocator) ID(spiffe string) IdentityID {
	if spiffe == "" {
		return UnknownIdentity
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.init()
	if id, ok := a.ids[spiffe]; ok {
		return id
	}
	id := a.free()
	if id == UnknownIdentity {
		return id
	}
	a.ids[spiffe] = id
	a.names[id] = spiffe
	return id
}

// free returns an unused number. Numbers are handed out in increasing order;
// only when the counter has passed MaxUint32 does it look for a gap left by
// a forgotten identity.
func (a *Allocator) free() IdentityID {
	if a.next <= math.MaxUint32 {
		id := IdentityID(a.next)
		a.next++
		return id
	}
	for n := uint64(1); n <= math.MaxUint32; n++ {
		if _, used := a.names[IdentityID(n)]; !used {
			return IdentityID(n)
		}
	}
	// 2^32-1 identities are known at once: there is no number to give, and
	// Compile reports the UnknownIdentity it gets as an error.
	return UnknownIdentity
}

func (a *Allocator) init() {
	if a.ids == nil {
		a.ids = map[string]IdentityID{}
		a.names = map[IdentityID]string{}
		a.next = 1
	}
}

// Lookup returns the number of spiffe without allocating one.
func (a *Allocator) Lookup(spiffe string) (IdentityID, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	id, ok := a.ids[spiffe]
	return id, ok
}

// Name returns the SPIFFE ID of id.
func (a *Allocator) Name(id IdentityID) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n, ok := a.names[id]
	return n, ok
}

// Len is the number of identities the allocator knows.
func (a *Allocator) Len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.ids)
}

// Retain forgets every identity for which keep returns false and reports
// how many it forgot. A forgotten identity that comes back gets a new
// number.
func (a *Allocator) Retain(keep func(spiffe string) bool) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for name, id := range a.ids {
		if !keep(name) {
			delete(a.ids, name)
			delete(a.names, id)
			n++
		}
	}
	return n
}

// allocatorState is the JSON form of an Allocator. Next is kept so that
// numbers of forgotten identities are not handed out again after a restart.
type allocatorState struct {
	Version    int                   `json:"version"`
	Next       uint64                `json:"next"`
	Identities map[string]IdentityID `json:"identities"`
}

const allocatorVersion = 1

// Save writes the allocator's state as JSON.
func (a *Allocator) Save(w io.Writer) error {
	a.mu.Lock()
	st := allocatorState{Version: allocatorVersion, Next: a.next, Identities: make(map[string]IdentityID, len(a.ids))}
	for k, v := range a.ids {
		st.Identities[k] = v
	}
	a.mu.Unlock()
	if st.Next == 0 {
		st.Next = 1
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(st); err != nil {
		return fmt.Errorf("save identities: %w", err)
	}
	return nil
}

// Load replaces the allocator's state with one written by Save. On error the
// allocator is left unchanged.
func (a *Allocator) Load(r io.Reader) error {
	var st allocatorState
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		return fmt.Errorf("load identities: %w: %w", ErrBadState, err)
	}
	if st.Version != allocatorVersion {
		return fmt.Errorf("load identities: %w: version %d, want %d", ErrBadState, st.Version, allocatorVersion)
	}
	ids := make(map[string]IdentityID, len(st.Identities))
	names := make(map[IdentityID]string, len(st.Identities))
	var highest uint64
	for name, id := range st.Identities {
		if name == "" || id == UnknownIdentity {
			return fmt.Errorf("load identities: %w: %q has number %d", ErrBadState, name, id)
		}
		if other, dup := names[id]; dup {
			return fmt.Errorf("load identities: %w: %q and %q share number %d", ErrBadState, name, other, id)
		}
		ids[name] = id
		names[id] = name
		highest = max(highest, uint64(id))
	}
	next := max(st.Next, highest+1, 1)
	if next > math.MaxUint32+1 {
		next = math.MaxUint32 + 1
	}
	a.mu.Lock()
	a.ids, a.names, a.next = ids, names, next
	a.mu.Unlock()
	return nil
}

// Snapshot returns the known identities by number, for status and tests.
func (a *Allocator) Snapshot() map[IdentityID]string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[IdentityID]string, len(a.names))
	for k, v := range a.names {
		out[k] = v
	}
	return out
}

// sortedIDs returns the keys of m in increasing order.
func sortedIDs[V any](m map[IdentityID]V) []IdentityID {
	out := make([]IdentityID, 0, len(m))
	for id := range m {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

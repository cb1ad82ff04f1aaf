package policy

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
)

func TestAllocatorStable(t *testing.T) {
	a := NewAllocator()
	if got := a.ID(""); got != UnknownIdentity {
		t.Fatalf("ID(\"\") = %d, want the unknown identity", got)
	}
	fe, be := a.ID("spiffe://td/ns/a/sa/fe"), a.ID("spiffe://td/ns/a/sa/be")
	if fe != 1 || be != 2 {
		t.Fatalf("first numbers %d, %d, want 1, 2", fe, be)
	}
	if again := a.ID("spiffe://td/ns/a/sa/fe"); again != fe {
		t.Fatalf("second ID of fe = %d, want %d", again, fe)
	}

	var buf bytes.Buffer
	if err := a.Save(&buf); err != nil {
		t.Fatal(err)
	}
	b := NewAllocator()
	if err := b.Load(bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	if got := b.ID("spiffe://td/ns/a/sa/be"); got != be {
		t.Fatalf("after restart be = %d, want %d", got, be)
	}
	if got := b.ID("spiffe://td/ns/a/sa/new"); got != 3 {
		t.Fatalf("new identity after restart = %d, want 3", got)
	}
	if name, ok := b.Name(fe); !ok || name != "spiffe://td/ns/a/sa/fe" {
		t.Fatalf("Name(%d) = %q, %v", fe, name, ok)
	}
}

func TestAllocatorRetainNeverReuses(t *testing.T) {
	a := NewAllocator()
	old := a.ID("spiffe://td/ns/a/sa/old")
	keep := a.ID("spiffe://td/ns/a/sa/keep")
	if n := a.Retain(func(s string) bool { return strings.HasSuffix(s, "/keep") }); n != 1 {
		t.Fatalf("Retain forgot %d, want 1", n)
	}
	if _, ok := a.Lookup("spiffe://td/ns/a/sa/old"); ok {
		t.Fatal("old identity still known")
	}
	// Neither a new identity nor the forgotten one coming back may take a
	// number a stale kernel entry could still hold, even across a restart.
	var buf bytes.Buffer
	if err := a.Save(&buf); err != nil {
		t.Fatal(err)
	}
	b := NewAllocator()
	if err := b.Load(&buf); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"spiffe://td/ns/a/sa/new", "spiffe://td/ns/a/sa/old"} {
		if id := b.ID(name); id == old || id == keep {
			t.Fatalf("%s got number %d, already used", name, id)
		}
	}
	if b.Len() != 3 {
		t.Fatalf("Len = %d, want 3", b.Len())
	}
}

func TestAllocatorLoadRejects(t *testing.T) {
	for _, tc := range []struct{ name, state string }{
		{"not json", `{`},
		{"wrong version", `{"version": 2, "next": 1, "identities": {}}`},
		{"zero number", `{"version": 1, "next": 2, "identities": {"spiffe://a": 0}}`},
		{"shared number", `{"version": 1, "next": 2, "identities": {"spiffe://a": 1, "spiffe://b": 1}}`},
		{"empty name", `{"version": 1, "next": 2, "identities": {"": 1}}`},
		{"unknown field", `{"version": 1, "next": 2, "identities": {}, "extra": 1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := NewAllocator()
			id := a.ID("spiffe://kept")
			err := a.Load(strings.NewReader(tc.state))
			if !errors.Is(err, ErrBadState) {
				t.Fatalf("Load: %v, want ErrBadState", err)
			}
			if got, ok := a.Lookup("spiffe://kept"); !ok || got != id {
				t.Fatal("a failed Load changed the allocator")
			}
		})
	}
}

func TestAllocatorLoadRaisesNext(t *testing.T) {
	// A state whose counter is behind its numbers (edited by hand) must not
	// hand out a number in use.
	a := NewAllocator()
	if err := a.Load(strings.NewReader(`{"version": 1, "next": 1, "identities": {"spiffe://a": 7}}`)); err != nil {
		t.Fatal(err)
	}
	if id := a.ID("spiffe://b"); id != 8 {
		t.Fatalf("new identity = %d, want 8", id)
	}
}

func TestAllocatorConcurrent(t *testing.T) {
	a := NewAllocator()
	var wg sync.WaitGroup
	got := make([][]IdentityID, 8)
	for g := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 100 {
				got[g] = append(got[g], a.ID(fmt.Sprintf("spiffe://td/ns/n/sa/%d", i)))
			}
		}()
	}
	wg.Wait()
	for g := range got {
		for i := range got[g] {
			if got[g][i] != got[0][i] {
				t.Fatalf("goroutines disagree on identity %d: %d vs %d", i, got[g][i], got[0][i])
			}
		}
	}
	if a.Len() != 100 {
		t.Fatalf("Len = %d, want 100", a.Len())
	}
}

func TestIPIdentity(t *testing.T) {
	in := Input{Workloads: testWorkloads()}
	// Two workloads of different identities claiming one address: neither
	// gets it.
	in.Workloads = append(in.Workloads, Workload{Namespace: "prod", Name: "clash", ServiceAccount: "other",
		IPs: in.Workloads[1].IPs[:1]})
	ids := NewAllocator()
	res, err := Compile(in, ids)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range testWorkloads() {
		sa := w.ServiceAccount
		if sa == "" {
			sa = "default"
		}
		want, _ := ids.Lookup(SPIFFEID(DefaultTrustDomain, w.Namespace, sa))
		for _, ip := range w.IPs {
			got, ok := res.IPIdentity[ip]
			if ip == in.Workloads[1].IPs[0] {
				if ok {
					t.Errorf("%s is claimed twice but maps to %d", ip, got)
				}
				continue
			}
			if got != want {
				t.Errorf("%s: identity %d, want %d", ip, got, want)
			}
		}
	}
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "10.0.1.1") {
		t.Errorf("warnings %q, want one about 10.0.1.1", res.Warnings)
	}
	// backend and backend-v2 share a service account, so an identity.
	if res.IPIdentity[testWorkloads()[2].IPs[0]] != res.IPIdentity[testWorkloads()[3].IPs[0]] {
		t.Error("workloads with one service account have different identities")
	}
}

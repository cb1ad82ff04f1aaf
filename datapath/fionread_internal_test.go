package datapath

import "testing"

// TestFionreadProbeMethod: without a psock the probe's connection reads
// exactly what was sent, so a short answer with a psock is the kernel's,
// not the probe's.
func TestFionreadProbeMethod(t *testing.T) {
	n, err := fionreadOf(false)
	if err != nil || n != fionreadProbeBytes {
		t.Fatalf("FIONREAD without a psock: %d, %v; want %d", n, err, fionreadProbeBytes)
	}
}

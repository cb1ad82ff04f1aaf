package testnet

import "testing"

func TestV6Addr(t *testing.T) {
	if got := v6Addr(150, 7).String(); got != "fd00:150::7" {
		t.Fatalf("v6Addr(150, 7) = %s", got)
	}
	if got := v6Addr(150, 200, 1).String(); got != "fd00:150:200::1" {
		t.Fatalf("v6Addr(150, 200, 1) = %s", got)
	}
}

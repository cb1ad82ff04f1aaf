package testnet

import (
	"strings"
	"testing"
)

func TestV6Addr(t *testing.T) {
	if got := v6Addr(150, 7).String(); got != "fd00:150::7" {
		t.Fatalf("v6Addr(150, 7) = %s", got)
	}
	if got := v6Addr(150, 200, 1).String(); got != "fd00:150:200::1" {
		t.Fatalf("v6Addr(150, 200, 1) = %s", got)
	}
}

func TestLineWriter(t *testing.T) {
	var lines []string
	w := &lineWriter{fn: func(s string) { lines = append(lines, s) }}
	for _, chunk := range []string{"a", "b\nc\r\n", "\nd"} {
		if _, err := w.Write([]byte(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	w.flush()
	if strings.Join(lines, "|") != "ab|c||d" {
		t.Fatalf("lines %q", lines)
	}
}

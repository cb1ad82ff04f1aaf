package lab

import (
	"strings"
	"testing"
)

func TestLineWriter(t *testing.T) {
	var lines []string
	w := &LineWriter{Line: func(s string) { lines = append(lines, s) }}
	for _, chunk := range []string{"a", "b\nc\r\n", "\nd"} {
		if _, err := w.Write([]byte(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	w.Flush()
	if strings.Join(lines, "|") != "ab|c||d" {
		t.Fatalf("lines %q", lines)
	}
}

func TestParseEvent(t *testing.T) {
	for _, tc := range []struct {
		line  string
		ok    bool
		event string
		n     int64
	}{
		{`{"event":"ready","port":15001}`, true, "ready", 15001},
		{`  {"event":"x"}  `, true, "x", 0},
		{`listening on 15001`, false, "", 0},
		{`{not json`, false, "", 0},
	} {
		ev, ok := ParseEvent(tc.line)
		if ok != tc.ok || ev.Str("event") != tc.event || ev.Int("port") != tc.n {
			t.Errorf("ParseEvent(%q) = %v, %v", tc.line, ev, ok)
		}
	}
}

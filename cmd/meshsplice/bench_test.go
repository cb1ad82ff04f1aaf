package main

import (
	"flag"
	"io"
	"testing"
	"time"
)

// TestSoakFlag: --soak alone is the documented 30 minutes, --soak=D is D,
// and a duration that is not positive is refused.
func TestSoakFlag(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		want    time.Duration
		wantErr bool
	}{
		{args: nil, want: 0},
		{args: []string{"--soak"}, want: 30 * time.Minute},
		{args: []string{"--soak=2m"}, want: 2 * time.Minute},
		{args: []string{"--soak=0s"}, wantErr: true},
		{args: []string{"--soak=-1m"}, wantErr: true},
		{args: []string{"--soak=soon"}, wantErr: true},
	} {
		fs := flag.NewFlagSet("bench", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		var f soakFlag
		fs.Var(&f, "soak", "")
		err := fs.Parse(tc.args)
		if (err != nil) != tc.wantErr || (err == nil && f.d != tc.want) {
			t.Errorf("%q: %v, err %v; want %v, err %v", tc.args, f.d, err, tc.want, tc.wantErr)
		}
	}
}

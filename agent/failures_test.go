package agent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

type recordedFailure struct{ what, object, err string }

type fakeSink struct{ got []recordedFailure }

func (f *fakeSink) Failure(what, object string, err error) {
	f.got = append(f.got, recordedFailure{what, object, err.Error()})
}

// TestFailuresAreCountedAndPassedOn: each failure is counted by kind and
// reaches the Events hook with its object.
func TestFailuresAreCountedAndPassedOn(t *testing.T) {
	sink := &fakeSink{}
	a := &Agent{cfg: Config{Events: sink}}
	a.failedOn("program_pod", "default/web", errors.New("map full"))
	a.failedOn("program_pod", "default/db", errors.New("map full"))
	a.failed("policy", errors.New("too big"))
	if got := a.Failures(); got["program_pod"] != 2 || got["policy"] != 1 || len(got) != 2 {
		t.Fatalf("counts %v", got)
	}
	want := []recordedFailure{{"program_pod", "default/web", "map full"}, {"program_pod", "default/db", "map full"}, {"policy", "", "too big"}}
	if len(sink.got) != len(want) {
		t.Fatalf("events %v, want %v", sink.got, want)
	}
	for i := range want {
		if sink.got[i] != want[i] {
			t.Fatalf("event %d: %v, want %v", i, sink.got[i], want[i])
		}
	}
	(&Agent{}).failed("policy", errors.New("no sink")) // nil Events: no panic
}

func TestBackoffDoublesToItsMaximum(t *testing.T) {
	var got []time.Duration
	limiter := newController(nil).limiter
	for range 9 {
		got = append(got, limiter.When("pod/x"))
	}
	want := []time.Duration{1, 2, 4, 8, 16, 32, 60, 60, 60}
	for i := range want {
		if got[i] != want[i]*time.Second {
			t.Fatalf("back-off %v, want %v s", got, want)
		}
	}
}

// TestStateFileWrites: a write replaces the file whole and leaves no
// temporary file; a corrupt file is moved aside under a new name.
func TestStateFileWrites(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "pods.json")
	for _, content := range []string{"first", "second, longer than the first"} {
		if err := writeFileSync(path, []byte(content)); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(path); err != nil || string(b) != content {
			t.Fatalf("read back %q, %v; want %q", b, err, content)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("files left: %v", entries)
	}
	aside, err := quarantine(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("corrupt file still in place: %v", err)
	}
	if b, err := os.ReadFile(aside); err != nil || string(b) != "second, longer than the first" {
		t.Fatalf("moved aside: %q, %v", b, err)
	}
}

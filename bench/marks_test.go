package bench

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/internal/lab"
)

// markLine is a window event as mstest prints it, with one role's reading
// taken at wall clock at.
func markLine(phase string, totalUS int64, at time.Time) string {
	return fmt.Sprintf(`{"event":"window","phase":%q,"cpu":{"client-app":{"total_us":%d,"user_us":%d,"system_us":0}},"unix_ns":%d}`,
		phase, totalUS, totalUS, at.UnixNano())
}

// TestWindowMarksUseTheClientsReadings: the CPU time of a window is the
// difference of the readings the client printed, however late the
// benchmark handles them (it used to read the cgroups itself on handling).
func TestWindowMarksUseTheClientsReadings(t *testing.T) {
	w := &windowMarks{root: t.TempDir()}
	t0 := time.Now()
	w.line(markLine("start", 1000, t0))
	w.line(`{"event":"result","conn":0}`) // not a mark
	w.line(markLine("end", 5000, t0.Add(100*time.Millisecond)))
	d, unknown, err := w.delta()
	if err != nil || unknown != "" {
		t.Fatalf("delta: %v %q", err, unknown)
	}
	if want := (lab.CPU{Total: 4 * time.Millisecond, User: 4 * time.Millisecond}); d["client-app"] != want {
		t.Fatalf("client-app %+v, want %+v", d["client-app"], want)
	}
}

func TestWindowMarksErrors(t *testing.T) {
	t0 := time.Now()
	for _, tc := range []struct {
		name  string
		lines []string
		want  string
	}{
		{"no marks", nil, "did not mark"},
		{"no end", []string{markLine("start", 1, t0)}, "did not mark"},
		{"no readings", []string{`{"event":"window","phase":"start"}`, markLine("end", 1, t0)}, "without CPU readings"},
		{"reading failed", []string{`{"event":"window","phase":"start","error":"client-app: no such file"}`, markLine("end", 1, t0)}, "no such file"},
		{"role at the end only", []string{
			markLine("start", 1, t0),
			`{"event":"window","phase":"end","cpu":{"client-app":{"total_us":2},"server-app":{"total_us":2}}}`,
		}, "server-app"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &windowMarks{root: t.TempDir()}
			for _, l := range tc.lines {
				w.line(l)
			}
			if _, _, err := w.delta(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("delta error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestWindowMarksCover: readings taken late against a window the load
// generator reports (fortio) make the window's CPU time unknown, never a
// number.
func TestWindowMarksCover(t *testing.T) {
	start := time.Now()
	const length = 150 * time.Millisecond
	for _, tc := range []struct {
		name       string
		read, done time.Duration // readings, after start
		unknown    bool
	}{
		{"on time", 200 * time.Microsecond, length + time.Millisecond, false},
		{"start read late", 20 * time.Millisecond, length + time.Millisecond, true},
		{"start read after the end", length + 5*time.Millisecond, length + 6*time.Millisecond, true},
		{"end read late", time.Millisecond, length + 30*time.Millisecond, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &windowMarks{root: t.TempDir()}
			w.line(markLine("start", 1000, start.Add(tc.read)))
			w.line(markLine("end", 2000, start.Add(tc.done)))
			w.covers(start, length, length/20)
			d, unknown, err := w.delta()
			if err != nil {
				t.Fatal(err)
			}
			if (unknown != "") != tc.unknown || (d == nil) != tc.unknown {
				t.Fatalf("delta %v, unknown %q; want unknown %v", d, unknown, tc.unknown)
			}
		})
	}
}

// TestUnknownCPU: a repetition whose CPU time is unknown does not count;
// a cell with none known reports null and "unknown", never 0.
func TestUnknownCPU(t *testing.T) {
	known := func(us int64) *sample {
		return &sample{units: 100, cpu: map[string]lab.CPU{"client-app": {Total: time.Duration(us) * time.Microsecond}}}
	}
	unknown := &sample{units: 100, cpuUnknown: "late"}
	if r := combine([]*sample{known(1000), unknown, known(3000)}); r.cpuPerUnit == nil || *r.cpuPerUnit != 20 || r.cpuByRole["client-app"].Total != 20 {
		t.Fatalf("mixed: %v %v", r.cpuPerUnit, r.cpuByRole)
	}
	r := combine([]*sample{unknown, {units: 0, cpu: map[string]lab.CPU{}}})
	if r.cpuPerUnit != nil || len(r.cpuByRole) != 0 || r.reps[0].CPUUSPerReq != nil {
		t.Fatalf("all unknown: %v %v %+v", r.cpuPerUnit, r.cpuByRole, r.reps)
	}
	rows := rows(Cell{Topology: SameNode, Workload: HTTP, Size: 1024, Conns: 2, Rate: 1000}, map[Mode]result{Direct: r})
	if rows[0].CPUUSPerReq != nil || rows[0].cpuText() != "unknown" {
		t.Fatalf("row: %v %q", rows[0].CPUUSPerReq, rows[0].cpuText())
	}
	if r := combine([]*sample{known(0)}); r.cpuPerUnit == nil || *r.cpuPerUnit != 0 {
		t.Fatalf("a measured 0 must stay visible (and fail the smoke test): %v", r.cpuPerUnit)
	}
}

package bench

import (
	"math"
	"slices"
	"time"
)

// logHist is a pooled log-scale latency histogram (1% buckets, see
// mstest's aggregate event): bucket i holds samples of [base^i, base^(i+1))
// nanoseconds.
type logHist struct {
	base   float64
	counts map[int64]int64
	n      int64
}

func newLogHist(h histogram) *logHist {
	l := &logHist{base: h.Base, counts: map[int64]int64{}}
	for _, b := range h.Buckets {
		l.counts[b[0]] += b[1]
		l.n += b[1]
	}
	return l
}

// merge adds o's samples; both must use the same base.
func (l *logHist) merge(o *logHist) {
	for i, c := range o.counts {
		l.counts[i] += c
	}
	l.n += o.n
}

// quantile returns the q-quantile in microseconds: the geometric middle of
// the bucket holding the sample of rank q*(n-1), as mstest ranks them.
func (l *logHist) quantile(q float64) float64 {
	if l.n == 0 {
		return 0
	}
	idx := make([]int64, 0, len(l.counts))
	for i := range l.counts {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	rank := int64(q * float64(l.n-1))
	var cum int64
	for _, i := range idx {
		cum += l.counts[i]
		if cum > rank {
			return math.Pow(l.base, float64(i)+0.5) / 1e3
		}
	}
	return math.Pow(l.base, float64(idx[len(idx)-1])+0.5) / 1e3
}

// median returns the median of v (the mean of the middle two for an even
// count), 0 for none.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// result is a cell's outcome in one mode, over every repetition.
type result struct {
	hasLatency          bool
	p50, p90, p99, p999 float64
	rps, bytesPerS      float64
	cpuPerUnit          *float64 // nil: unknown
	cpuByRole           map[string]RoleCPU
	reps                []RepStat
	evidence            Evidence
	foreignPct          float64
}

// combine pools the repetitions of a cell in a mode: latency percentiles
// from the pooled histogram (mstest) or the median of the runs' own
// percentiles (fortio); rates and CPU time are medians.
func combine(samples []*sample) result {
	var r result
	if len(samples) == 0 {
		return r
	}
	r.cpuByRole = map[string]RoleCPU{}
	var rps, bps, cpu []float64
	var p50, p90, p99, p999 []float64
	roles := map[string][3][]float64{}
	var pooled *logHist
	pool := true
	for _, s := range samples {
		rps = append(rps, s.rps)
		bps = append(bps, s.bytesPerS)
		perUnit, known := s.cpuPerUnit()
		if known {
			cpu = append(cpu, perUnit)
		}
		for role, d := range s.cpu {
			if !known {
				break
			}
			per := func(t time.Duration) float64 {
				return float64(t.Nanoseconds()) / 1e3 / float64(s.units)
			}
			v := roles[role]
			v[0], v[1], v[2] = append(v[0], per(d.Total)), append(v[1], per(d.User)), append(v[2], per(d.System))
			roles[role] = v
		}
		p50, p90, p99, p999 = append(p50, s.p50), append(p90, s.p90), append(p99, s.p99), append(p999, s.p999)
		r.hasLatency = r.hasLatency || s.hasLatency
		if s.hist == nil {
			pool = false
		} else if pooled == nil {
			pooled = &logHist{base: s.hist.base, counts: map[int64]int64{}}
			pooled.merge(s.hist)
		} else {
			pooled.merge(s.hist)
		}
		r.reps = append(r.reps, RepStat{P50US: round(s.p50), P99US: round(s.p99), RPS: round(s.rps), CPUUSPerReq: roundPtr(perUnit, known), ForeignCPUPct: round(s.foreignPct)})
		r.evidence.add(s.evidence)
		r.foreignPct = math.Max(r.foreignPct, s.foreignPct)
	}
	r.rps, r.bytesPerS, r.cpuPerUnit = median(rps), median(bps), roundPtr(median(cpu), len(cpu) > 0)
	for role, v := range roles {
		r.cpuByRole[role] = RoleCPU{Total: round(median(v[0])), User: round(median(v[1])), System: round(median(v[2]))}
	}
	if r.hasLatency {
		if pool && pooled != nil && pooled.n > 0 {
			r.p50, r.p90, r.p99, r.p999 = pooled.quantile(0.50), pooled.quantile(0.90), pooled.quantile(0.99), pooled.quantile(0.999)
		} else {
			r.p50, r.p90, r.p99, r.p999 = median(p50), median(p90), median(p99), median(p999)
		}
	}
	return r
}

// roundPtr is round(v), or nil (unknown) when not known.
func roundPtr(v float64, known bool) *float64 {
	if !known {
		return nil
	}
	return ptr(round(v))
}

// round keeps two decimals: the JSON carries measurements, not noise.
func round(v float64) float64 { return math.Round(v*100) / 100 }

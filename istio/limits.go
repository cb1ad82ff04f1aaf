package istio

import "fmt"

// maxReported bounds the warnings and the errors ParseTraffic reports one
// by one: a pod's annotations may hold 10,000 bad entries, and the report
// reaches logs, API answers and pod status. The rest are counted.
const maxReported = 20

// sum appends the count of what was left out.
func (p *parser) sum() {
	if p.moreWarns > 0 {
		p.warns = append(p.warns, fmt.Sprintf("(%d more warnings not shown)", p.moreWarns))
	}
	if p.moreErrs > 0 {
		p.errs = append(p.errs, fmt.Errorf("(%d more errors not shown)", p.moreErrs))
	}
}

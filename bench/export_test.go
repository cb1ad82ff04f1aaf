package bench

import (
	"testing"
	"time"
)

// SetMarkDelay delays the benchmark's handling of the clients' window
// marks by d until the test ends.
func SetMarkDelay(tb testing.TB, d time.Duration) {
	markDelay = d
	tb.Cleanup(func() { markDelay = 0 })
}

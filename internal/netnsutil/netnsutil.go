// Package netnsutil runs code inside another network namespace, safely.
//
// A Go program can enter a network namespace only per OS thread (setns), and
// the Go scheduler moves goroutines between threads. Do therefore runs the
// function on a goroutine locked to its thread, and, if that thread cannot
// get back to its namespace, leaves it locked so that Go discards it rather
// than run other goroutines in the wrong namespace (see the
// containernetworking/plugins pkg/ns README for the long story). Processes
// started from inside fn inherit the namespace.
package netnsutil

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn inside the network namespace at path (/run/netns/x,
// /proc/PID/ns/net) and returns its error.
func Do(path string, fn func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		err = fn()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

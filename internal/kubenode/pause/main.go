// Command pause is the sandbox ("pause") container of make e2e-node's
// node: it holds the pod's namespaces and waits for SIGTERM or SIGINT.
// Static, so that it runs in an image FROM scratch.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}

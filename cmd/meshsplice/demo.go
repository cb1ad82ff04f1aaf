package main

import (
	"context"
	"flag"
	"os"
	"path/filepath"

	"github.com/meshsplice/meshsplice/internal/demo"
)

func runDemo(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	exe, _ := os.Executable()
	binDir := fs.String("bin-dir", filepath.Dir(exe), "directory holding meshsplice, meshsplice-cni, mstest and cni/{bridge,host-local} (make demo builds them into bin/)")
	requests := fs.Int("requests", 2000, "requests per mode and round in the latency comparison")
	rounds := fs.Int("rounds", 3, "rounds of the latency comparison")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return demo.Run(ctx, demo.Options{BinDir: *binDir, Requests: *requests, Rounds: *rounds, Out: os.Stdout})
}

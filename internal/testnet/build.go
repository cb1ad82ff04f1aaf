package testnet

import (
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"testing"
)

// BuildBinary builds the main package pkg (an import path such as
// "github.com/meshsplice/meshsplice/e2e/mstest", or a path relative to the
// test's working directory such as "." or "../../e2e/mstest") with the go
// command from PATH and returns the absolute path of the binary. The binary
// lives in a world-readable temporary directory, so that processes started
// with a non-root UID can execute it, and is removed by the test's cleanup.
// Repeated builds are cheap thanks to the go build cache.
func BuildBinary(tb testing.TB, pkg string) string {
	tb.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		tb.Fatalf("testnet: build %s: go command not found: %v", pkg, err)
	}
	dir, err := os.MkdirTemp("", "mstest-bin-")
	if err != nil {
		tb.Fatalf("testnet: build %s: %v", pkg, err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatalf("testnet: build %s: %v", pkg, err)
	}
	name := path.Base(filepath.ToSlash(pkg))
	if name == "." || name == "/" || name == ".." {
		wd, _ := os.Getwd()
		name = filepath.Base(wd)
	}
	out := filepath.Join(dir, name)
	cmd := exec.Command(gobin, "build", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("testnet: go build %s: %v\n%s", pkg, err, b)
	}
	if err := os.Chmod(out, 0o755); err != nil {
		tb.Fatalf("testnet: build %s: %v", pkg, err)
	}
	return out
}

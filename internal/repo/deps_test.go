package repo

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// fakeApt is a directory with a dpkg-query that reports every package
// installed except those in missing, and an apt-get that logs its
// arguments to the file it returns and fails the subcommand failOn names
// ("update" or "install"), as apt-get does (exit 100).
func fakeApt(t *testing.T, missing []string, failOn string) (dir, log string) {
	t.Helper()
	// Not t.TempDir: its parent is private, and one case runs as nobody.
	dir, err := os.MkdirTemp("", "mstest-deps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if failOn == "" {
		failOn = "never"
	}
	log = filepath.Join(dir, "apt.log")
	if err := os.WriteFile(log, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(log, 0o666); err != nil {
		t.Fatal(err)
	}
	dpkg := "#!/bin/sh\n# dpkg-query -W -f=FORMAT PKG...\nshift 2\nfor p in \"$@\"; do\n\tcase \" " +
		strings.Join(missing, " ") + " \" in\n\t*\" $p \"*) ;;\n\t*) echo \"$p install ok installed\" ;;\n\tesac\ndone\n"
	apt := "#!/bin/sh\necho \"$*\" >>" + log + "\ncase \"$1\" in " + failOn + ") echo \"E: $1 failed\" >&2; exit 100 ;; esac\nexit 0\n"
	for name, body := range map[string]string{"dpkg-query": dpkg, "apt-get": apt} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir, log
}

// runDeps runs hack/deps.sh with the fake apt first in PATH, as uid when
// uid is not -1.
func runDeps(t *testing.T, fake string, uid int, args ...string) (out string, code int) {
	t.Helper()
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(root, "hack", "deps.sh")
	var cmd *exec.Cmd
	if uid >= 0 && os.Geteuid() == 0 {
		id := strconv.Itoa(uid)
		cmd = exec.Command("setpriv", append([]string{"--reuid=" + id, "--regid=" + id, "--clear-groups", script}, args...)...)
	} else {
		cmd = exec.Command(script, args...)
	}
	cmd.Env = append(os.Environ(), "PATH="+fake+":"+os.Getenv("PATH"))
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run %s: %v", script, err)
	}
	return b.String(), code
}

func readLog(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestDeps runs hack/deps.sh against a fake dpkg-query and apt-get: it must
// say nothing and install nothing when all is there, name what it installs
// and why, and fail clearly when it cannot install.
func TestDeps(t *testing.T) {
	for _, tc := range []struct {
		name     string
		missing  []string
		failOn   string
		nonRoot  bool
		args     []string
		wantCode int
		wantOut  []string // substrings, in order; nil: no output at all
		wantApt  string   // the apt-get calls, one a line
	}{
		{name: "all present", args: []string{"demo", "test", "bench", "lint", "generate"}},
		{
			name: "dry run", missing: []string{"iptables"}, args: []string{"--dry-run", "demo"},
			wantOut: []string{"make demo needs what this machine lacks", "iptables (Debian package): iptables-nft-restore",
				"would run: apt-get update && apt-get install -y --no-install-recommends iptables"},
		},
		{
			name: "installs what is missing", missing: []string{"iptables", "util-linux"}, args: []string{"demo"},
			wantOut: []string{"util-linux (Debian package): nsenter", "iptables (Debian package)",
				"installing with apt-get: util-linux iptables", "done"},
			wantApt: "update -qq\ninstall -y -qq --no-install-recommends util-linux iptables\n",
		},
		{
			name: "only the target's packages", missing: []string{"clang-19"}, args: []string{"demo"},
		},
		{
			name: "not root", missing: []string{"iproute2"}, nonRoot: true, args: []string{"demo"}, wantCode: 1,
			wantOut: []string{"iproute2 (Debian package)", "installing Debian packages needs root", "sudo apt-get install -y iproute2"},
		},
		{
			name: "apt-get update fails", missing: []string{"iproute2"}, failOn: "update", args: []string{"demo"}, wantCode: 1,
			wantOut: []string{"E: update failed", "apt-get update failed: check the network"},
			wantApt: "update -qq\n",
		},
		{
			name: "apt-get install fails", missing: []string{"iproute2"}, failOn: "install", args: []string{"demo"}, wantCode: 1,
			wantOut: []string{"E: install failed", "apt-get install iproute2 failed"},
			wantApt: "update -qq\ninstall -y -qq --no-install-recommends iproute2\n",
		},
		{
			name: "unknown target", args: []string{"tset"}, wantCode: 1,
			wantOut: []string{"unknown target tset (known: bench demo e2e-node generate lint test)"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake, log := fakeApt(t, tc.missing, tc.failOn)
			uid := -1
			if tc.nonRoot {
				uid = 65534
			}
			out, code := runDeps(t, fake, uid, tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d; output:\n%s", code, tc.wantCode, out)
			}
			if tc.wantOut == nil && out != "" {
				t.Errorf("printed something with nothing to do:\n%s", out)
			}
			rest := out
			for _, w := range tc.wantOut {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Errorf("output lacks %q (in order); output:\n%s", w, out)
					break
				}
				rest = rest[i+len(w):]
			}
			if got := readLog(t, log); got != tc.wantApt {
				t.Errorf("apt-get calls:\n%s\nwant:\n%s", got, tc.wantApt)
			}
		})
	}
}

// TestDepsUsedEverywhere: the make targets and .ci/run install through
// hack/deps.sh, and nothing else calls apt-get, so they cannot disagree.
func TestDepsUsedEverywhere(t *testing.T) {
	root, err := Root()
	if err != nil {
		t.Fatal(err)
	}
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	for target, group := range map[string]string{
		"test": "test", "demo": "demo", "bench": "bench", "lint": "lint", "generate": "generate", "check-generated": "generate",
	} {
		recipe := regexp.MustCompile(`(?ms)^` + regexp.QuoteMeta(target) + `:[^\n]*\n((?:\t[^\n]*\n)*)`).FindSubmatch(mk)
		if recipe == nil {
			t.Errorf("Makefile has no target %s", target)
			continue
		}
		if !regexp.MustCompile(`(?m)^\t@?\$\(DEPS\) ` + regexp.QuoteMeta(group) + `$`).Match(recipe[1]) {
			t.Errorf("make %s does not run $(DEPS) for its needs:\n%s", target, recipe[1])
		}
	}
	if !regexp.MustCompile(`(?m)^DEPS := \./hack/deps\.sh$`).Match(mk) {
		t.Errorf("Makefile: DEPS is not ./hack/deps.sh")
	}
	ci, err := os.ReadFile(filepath.Join(root, ".ci", "run"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(ci, []byte("hack/deps.sh")) || !bytes.Contains(ci, []byte("\nmake test\n")) {
		t.Errorf(".ci/run must install through hack/deps.sh and run make test")
	}
	_, files := tracked(t)
	for _, f := range files {
		if f == "hack/deps.sh" || strings.HasSuffix(f, ".go") || strings.HasSuffix(f, ".md") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(root, f))
		if err == nil && regexp.MustCompile(`(?m)^[^#\n]*apt-get (install|update)`).Match(b) {
			t.Errorf("%s calls apt-get itself: add the package to hack/deps.sh instead", f)
		}
	}
}

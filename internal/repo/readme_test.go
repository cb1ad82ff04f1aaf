package repo

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// runBy names, for a command the READMEs show that this test cannot check
// by itself, the test file that runs it as written.
var runBy = map[string]string{
	"cnitool": "cni/readme_test.go",
	"curl":    "cni/readme_test.go",
}

// words splits a shell command into words (quotes removed), stopping at a
// redirection or a pipe.
func words(cmd string) []string {
	var out []string
	var cur strings.Builder
	in := false
	var quote rune
	for _, r := range cmd {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '\'' || r == '"':
			quote, in = r, true
		case r == ' ' || r == '\t':
			if in {
				out = append(out, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteRune(r)
			in = true
		}
	}
	if in {
		out = append(out, cur.String())
	}
	for i, w := range out {
		if w == ">" || w == "|" || w == ">>" || w == "2>&1" {
			return out[:i]
		}
	}
	return out
}

var assignRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// cli is the meshsplice command's help, built once.
type cli struct {
	commands []string
	flags    map[string][]string // command -> its flags, without dashes
}

func helpOf(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s %v: %v", bin, args, err)
	}
	return string(out)
}

func loadCLI(t *testing.T, root string) *cli {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "meshsplice")
	if out, err := exec.Command("go", "build", "-C", root, "-o", bin, "./cmd/meshsplice").CombinedOutput(); err != nil {
		t.Fatalf("build meshsplice: %v\n%s", err, out)
	}
	c := &cli{flags: map[string][]string{}}
	for _, m := range regexp.MustCompile(`(?m)^  ([a-z][a-z-]*) `).FindAllStringSubmatch(helpOf(t, bin, "-h"), -1) {
		c.commands = append(c.commands, m[1])
	}
	if len(c.commands) == 0 {
		t.Fatalf("meshsplice -h lists no command")
	}
	for _, cmd := range c.commands {
		for _, m := range regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(helpOf(t, bin, cmd, "-h"), -1) {
			c.flags[cmd] = append(c.flags[cmd], m[1])
		}
	}
	return c
}

// checkMeshsplice reports what in a meshsplice command line does not exist.
func (c *cli) check(args []string) []string {
	if len(args) == 0 || !slices.Contains(c.commands, args[0]) {
		return []string{"no meshsplice command " + strings.Join(args[:min(1, len(args))], "")}
	}
	var bad []string
	for _, a := range args[1:] {
		a = strings.Trim(a, "[]")
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !slices.Contains(c.flags[args[0]], name) {
			bad = append(bad, "meshsplice "+args[0]+" has no flag "+a)
		}
	}
	return bad
}

// makeTargets returns the Makefile's targets and the variables it uses.
func makeTargets(t *testing.T, root string) (targets, vars []string) {
	t.Helper()
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^([a-z][a-z0-9-]*):`).FindAllStringSubmatch(string(mk), -1) {
		targets = append(targets, m[1])
	}
	for _, m := range regexp.MustCompile(`\$\(([A-Z_]+)\)`).FindAllStringSubmatch(string(mk), -1) {
		vars = append(vars, m[1])
	}
	return targets, vars
}

// TestREADMECommands: every command in a shell block of a Markdown file git
// tracks exists as written: make targets and variables in the Makefile,
// meshsplice commands and flags in its -h, and anything else is run as
// written by the test runBy names. The agent's flag table in README.md is
// checked too.
func TestREADMECommands(t *testing.T) {
	root, files := tracked(t)
	c := loadCLI(t, root)
	targets, vars := makeTargets(t, root)
	checked := 0
	for _, f := range files {
		if !strings.HasSuffix(f, ".md") {
			continue
		}
		md, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range CodeBlocks(string(md)) {
			if b.Lang != "sh" {
				continue
			}
			for _, cmd := range Commands(b.Text) {
				w := words(cmd)
				for len(w) > 0 && assignRE.MatchString(w[0]) {
					w = w[1:]
				}
				if len(w) == 0 {
					continue // only assignments, used by the next commands
				}
				checked++
				var bad []string
				switch prog := w[0]; {
				case prog == "make":
					for _, a := range w[1:] {
						if name, _, ok := strings.Cut(a, "="); ok {
							if !slices.Contains(vars, name) {
								bad = append(bad, "the Makefile uses no variable "+name)
							}
						} else if !slices.Contains(targets, a) {
							bad = append(bad, "the Makefile has no target "+a)
						}
					}
				case prog == "meshsplice" || strings.HasSuffix(prog, "/meshsplice"):
					bad = c.check(w[1:])
				case runBy[prog] != "":
					src, err := os.ReadFile(filepath.Join(root, runBy[prog]))
					if err != nil || !strings.Contains(string(src), prog) || !strings.Contains(string(src), filepath.Base(f)) {
						bad = append(bad, runBy[prog]+" does not run it")
					}
				default:
					bad = append(bad, "neither checked here nor run by a test: run it in a test and name that test in runBy")
				}
				for _, m := range bad {
					t.Errorf("%s:%d: %s: %s", f, b.Line, cmd, m)
				}
			}
		}
	}
	if checked < 10 {
		t.Errorf("only %d commands found in the Markdown files", checked)
	}

	// The agent's flag table.
	md, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	section := string(md)
	if i := strings.Index(section, "## Running it on a node"); i >= 0 {
		section = section[i:]
		if j := strings.Index(section[3:], "\n## "); j >= 0 {
			section = section[:j+3]
		}
	}
	var flags []string
	for _, m := range regexp.MustCompile("(?m)^\\| (`--[^|]*)\\|").FindAllStringSubmatch(section, -1) {
		for _, f := range regexp.MustCompile("`--([a-z0-9-]+)").FindAllStringSubmatch(m[1], -1) {
			flags = append(flags, f[1])
		}
	}
	if len(flags) < 5 {
		t.Errorf("README.md: the agent's flag table lists %d flags: %v", len(flags), flags)
	}
	for _, f := range flags {
		if !slices.Contains(c.flags["agent"], f) {
			t.Errorf("README.md: the agent's flag table lists --%s, which meshsplice agent does not have", f)
		}
	}
}

func TestWords(t *testing.T) {
	got := words(`A='x y' bin/meshsplice bench --json "a b" > out.json`)
	want := []string{"A=x y", "bin/meshsplice", "bench", "--json", "a b"}
	if !slices.Equal(got, want) {
		t.Errorf("words = %q, want %q", got, want)
	}
}

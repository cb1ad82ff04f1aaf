package install

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// conflists are real ones: containerd's default (bridge + portmap),
// Calico's, and Calico's with istio-cni chained after it.
var conflists = []string{"bridge-portmap.conflist", "calico.conflist", "istio-cni.conflist"}

// node makes a conf dir holding testdata/name (as 10-name, the node's
// primary conflist) and a bin dir, and returns the Config and the path.
func node(tb testing.TB, name string) (Config, string, []byte) {
	tb.Helper()
	orig, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	c := Config{ConfDir: filepath.Join(dir, "net.d"), BinDir: filepath.Join(dir, "bin"),
		PluginSrc: filepath.Join(dir, "plugin"), AgentSocket: "/run/meshsplice/cni.sock", AgentUnreachable: "fail"}
	for _, d := range []string{c.ConfDir, c.BinDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	if err := os.WriteFile(c.PluginSrc, []byte("#!/bin/true\n"), 0o755); err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(c.ConfDir, "10-"+name)
	if err := os.WriteFile(path, orig, 0o644); err != nil {
		tb.Fatal(err)
	}
	return c, path, orig
}

func read(tb testing.TB, path string) []byte {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// checkChained asserts the file is a valid conflist (as libcni loads it)
// whose last plugin is meshsplice-cni, after the node's own plugins.
func checkChained(tb testing.TB, path string, origTypes []string) {
	tb.Helper()
	l, err := libcni.ConfListFromFile(path)
	if err != nil {
		tb.Fatalf("libcni rejects the chained conflist: %v", err)
	}
	var types []string
	for _, p := range l.Plugins {
		types = append(types, p.Network.Type)
	}
	want := append(append([]string(nil), origTypes...), PluginType)
	if len(types) != len(want) {
		tb.Fatalf("plugins %v, want %v", types, want)
	}
	for i := range want {
		if types[i] != want[i] {
			tb.Fatalf("plugins %v, want %v", types, want)
		}
	}
}

func types(tb testing.TB, b []byte) []string {
	tb.Helper()
	l, err := libcni.ConfListFromBytes(b)
	if err != nil {
		tb.Fatal(err)
	}
	var ts []string
	for _, p := range l.Plugins {
		ts = append(ts, p.Network.Type)
	}
	return ts
}

func TestInstallGolden(t *testing.T) {
	for _, name := range conflists {
		t.Run(name, func(t *testing.T) {
			c, path, orig := node(t, name)
			changed, err := Install(c)
			if err != nil || !changed {
				t.Fatalf("Install = %v, %v; want true, nil", changed, err)
			}
			checkChained(t, path, types(t, orig))
			got := read(t, path)
			golden := filepath.Join("testdata", name+".chained")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if want := read(t, golden); string(got) != string(want) {
				t.Errorf("chained conflist differs from %s (go test -update):\n%s", golden, got)
			}
			if string(read(t, filepath.Join(c.BinDir, PluginType))) != "#!/bin/true\n" {
				t.Error("plugin binary not copied")
			}
		})
	}
}

func TestInstallIdempotent(t *testing.T) {
	for _, name := range conflists {
		t.Run(name, func(t *testing.T) {
			c, path, _ := node(t, name)
			if _, err := Install(c); err != nil {
				t.Fatal(err)
			}
			first := read(t, path)
			changed, err := Install(c)
			if err != nil || changed {
				t.Fatalf("second Install = %v, %v; want false, nil", changed, err)
			}
			if string(read(t, path)) != string(first) {
				t.Error("second Install rewrote the conflist")
			}
		})
	}
}

// TestInstallRepairsRewrite: the node's CNI writes its conflist again
// (without meshsplice-cni, reformatted): Install chains it again, and
// Uninstall then gives back the node's newest file.
func TestInstallRepairsRewrite(t *testing.T) {
	for _, name := range conflists {
		t.Run(name, func(t *testing.T) {
			c, path, orig := node(t, name)
			if _, err := Install(c); err != nil {
				t.Fatal(err)
			}
			rewritten := append([]byte("\n"), orig...) // other bytes, same config
			if err := os.WriteFile(path, rewritten, 0o644); err != nil {
				t.Fatal(err)
			}
			changed, err := Install(c)
			if err != nil || !changed {
				t.Fatalf("Install after rewrite = %v, %v; want true, nil", changed, err)
			}
			checkChained(t, path, types(t, orig))
			if err := Uninstall(c); err != nil {
				t.Fatal(err)
			}
			if got := read(t, path); string(got) != string(rewritten) {
				t.Errorf("Uninstall wrote\n%s\nwant the rewritten file byte for byte\n%s", got, rewritten)
			}
		})
	}
}

func TestUninstallRestoresBytes(t *testing.T) {
	for _, name := range conflists {
		t.Run(name, func(t *testing.T) {
			c, path, orig := node(t, name)
			for range 2 { // twice: idempotent both ways
				if _, err := Install(c); err != nil {
					t.Fatal(err)
				}
				if _, err := Install(c); err != nil {
					t.Fatal(err)
				}
				if err := Uninstall(c); err != nil {
					t.Fatal(err)
				}
				if got := read(t, path); string(got) != string(orig) {
					t.Fatalf("after Uninstall:\n%s\nwant byte for byte\n%s", got, orig)
				}
			}
			if err := Uninstall(c); err != nil {
				t.Fatal(err)
			}
			entries, err := os.ReadDir(c.ConfDir)
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != 1 {
				t.Errorf("conf dir holds %d entries after Uninstall, want only the conflist", len(entries))
			}
			if _, err := os.Stat(filepath.Join(c.BinDir, PluginType)); !os.IsNotExist(err) {
				t.Errorf("plugin binary left in the bin dir: %v", err)
			}
		})
	}
}

// TestUninstallAfterForeignEdit: someone else edited the chained file
// (here: compacted it); Uninstall removes only meshsplice-cni's entry.
func TestUninstallAfterForeignEdit(t *testing.T) {
	c, path, orig := node(t, "calico.conflist")
	if _, err := Install(c); err != nil {
		t.Fatal(err)
	}
	edited := append(read(t, path), '\n')
	if err := os.WriteFile(path, edited, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Uninstall(c); err != nil {
		t.Fatal(err)
	}
	got := read(t, path)
	if ts, want := types(t, got), types(t, orig); len(ts) != len(want) || ts[len(ts)-1] == PluginType {
		t.Errorf("after Uninstall plugins are %v, want %v", ts, want)
	}
}

func TestInstallNoConflist(t *testing.T) {
	c, path, _ := node(t, "calico.conflist")
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(c); err == nil {
		t.Fatal("Install without a conflist succeeded")
	}
}

// TestWatchRepairs: Watch re-chains a conflist the node's CNI rewrote,
// from the inotify event (the resync tick is 30 s; the test waits for the
// file, with no time limit of its own).
func TestWatchRepairs(t *testing.T) {
	c, path, orig := node(t, "bridge-portmap.conflist")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, c, slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	waitChained(t, path)
	if err := os.WriteFile(path+".new", orig, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil { // as CNI installers write
		t.Fatal(err)
	}
	waitChained(t, path)
	checkChained(t, path, types(t, orig))
}

func waitChained(tb testing.TB, path string) {
	tb.Helper()
	for {
		b, err := os.ReadFile(path)
		if err == nil {
			if l, err := libcni.ConfListFromBytes(b); err == nil && l.Plugins[len(l.Plugins)-1].Network.Type == PluginType {
				return
			}
		}
		time.Sleep(10 * time.Millisecond) // a poll interval, not a deadline
	}
}

// TestInstallRefuses: conflists the plugin cannot be chained into are left
// untouched, with an error that says why.
func TestInstallRefuses(t *testing.T) {
	for _, tc := range []struct{ name, conf, want string }{
		{"old cniVersion", `{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}`, `cniVersion "0.2.0"`},
		{"no cniVersion", `{"name":"n","plugins":[{"type":"bridge"}]}`, `cniVersion ""`},
		// A .conf is converted (conf.go); a .conflist must hold a list.
		{"single plugin in a .conflist", `{"cniVersion":"1.0.0","name":"n","type":"bridge"}`, `no "plugins"`},
		{"no plugins", `{"cniVersion":"1.0.0","name":"n","plugins":[]}`, "nothing to chain after"},
		{"not JSON", `cniVersion: 1.0.0`, "not a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, path, _ := node(t, "calico.conflist")
			if err := os.WriteFile(path, []byte(tc.conf), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Install(c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Install = %v, want an error with %q", err, tc.want)
			}
			if got := string(read(t, path)); got != tc.conf {
				t.Errorf("Install changed the refused conflist to %s", got)
			}
		})
	}
}

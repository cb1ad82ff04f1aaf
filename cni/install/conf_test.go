package install

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// TestInstallSingleConf: a node whose CNI wrote a single-plugin .conf (the
// bridge example of the CNI spec). Install turns it into a conflist of the
// same name with the .conflist extension, the node's plugin first and
// meshsplice-cni after it (as libcni itself turns a .conf into a list, and
// as istio-cni does), and removes the .conf so the runtime takes the
// conflist; a second Install changes nothing; Uninstall puts the .conf
// back byte for byte and removes the conflist. A .conf the node rewrites
// meanwhile is converted again (Watch's repair).
func TestInstallSingleConf(t *testing.T) {
	for _, ext := range []string{".conf", ".json"} {
		t.Run(ext, func(t *testing.T) {
			c, conf, orig := node(t, "bridge.conf")
			if ext != ".conf" {
				p := strings.TrimSuffix(conf, ".conf") + ext
				if err := os.Rename(conf, p); err != nil {
					t.Fatal(err)
				}
				conf = p
			}
			list := strings.TrimSuffix(conf, ext) + ".conflist"
			changed, err := Install(c)
			if err != nil || !changed {
				t.Fatalf("Install = %v, %v; want true, nil", changed, err)
			}
			if _, err := os.Stat(conf); !os.IsNotExist(err) {
				t.Errorf("the %s is still there (%v): the runtime would take it, unchained", ext, err)
			}
			checkChained(t, list, []string{"bridge"})
			l, err := libcni.ConfListFromFile(list)
			if err != nil {
				t.Fatal(err)
			}
			if l.Name != "mynet" || l.CNIVersion != "0.4.0" {
				t.Errorf("conflist name %q cniVersion %q, want the .conf's mynet 0.4.0", l.Name, l.CNIVersion)
			}
			if p, err := Primary(c.ConfDir); err != nil || p != list {
				t.Errorf("Primary = %s, %v; want %s", p, err, list)
			}
			chained := read(t, list)
			if changed, err := Install(c); err != nil || changed {
				t.Fatalf("second Install = %v, %v; want false, nil", changed, err)
			}
			if string(read(t, list)) != string(chained) {
				t.Error("second Install rewrote the conflist")
			}

			// The node's CNI writes its .conf again: converted again.
			rewritten := []byte(strings.Replace(string(orig), "10.22.0.0/16", "10.23.0.0/16", 1))
			if err := os.WriteFile(conf, rewritten, 0o644); err != nil {
				t.Fatal(err)
			}
			if changed, err := Install(c); err != nil || !changed {
				t.Fatalf("Install after the rewrite = %v, %v; want true, nil", changed, err)
			}
			if b := read(t, list); !strings.Contains(string(b), "10.23.0.0/16") {
				t.Errorf("conflist after the rewrite lacks the new subnet:\n%s", b)
			}

			if err := Uninstall(c); err != nil {
				t.Fatal(err)
			}
			if got := read(t, conf); string(got) != string(rewritten) {
				t.Errorf("Uninstall restored\n%s\nwant the node's last .conf, byte for byte:\n%s", got, rewritten)
			}
			if _, err := os.Stat(list); !os.IsNotExist(err) {
				t.Errorf("the conflist Install made is still there (%v)", err)
			}
			ents, _ := os.ReadDir(c.ConfDir)
			if len(ents) != 1 {
				t.Errorf("conf dir after Uninstall: %v, want only the %s", ents, ext)
			}
		})
	}
}

// TestUninstallSingleConfRewritten: the conflist made from a .conf was
// rewritten since (not as Install wrote it): Uninstall only takes the
// plugin out of it, and leaves the .conf it came from absent.
func TestUninstallSingleConfRewritten(t *testing.T) {
	c, conf, _ := node(t, "bridge.conf")
	if _, err := Install(c); err != nil {
		t.Fatal(err)
	}
	list := strings.TrimSuffix(conf, ".conf") + ".conflist"
	b := read(t, list)
	edited := strings.Replace(string(b), `"mynet"`, `"mynet2"`, 1)
	if err := os.WriteFile(list, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Uninstall(c); err != nil {
		t.Fatal(err)
	}
	l, err := libcni.ConfListFromFile(list)
	if err != nil {
		t.Fatal(err)
	}
	if l.Name != "mynet2" || len(l.Plugins) != 1 || l.Plugins[0].Network.Type != "bridge" {
		t.Errorf("after Uninstall: %s with %d plugins", l.Name, len(l.Plugins))
	}
	if _, err := os.Stat(conf); !os.IsNotExist(err) {
		t.Errorf(".conf came back over an edited conflist (%v)", err)
	}
	if _, err := os.Stat(filepath.Join(c.ConfDir, backupDir)); !os.IsNotExist(err) {
		t.Errorf("backup dir left (%v)", err)
	}
}

package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// A node's CNI may write a single-plugin network configuration (*.conf or
// *.json with a "type" and no "plugins"). Install then does what libcni
// does when it loads one (ConfListFromConf) and what istio-cni does: it
// writes the same network as a list, NAME.conflist, the node's plugin
// first and meshsplice-cni after it, and removes the .conf so the runtime
// takes the list. It keeps the .conf in the backup dir and records where
// the list came from (NAME.conflist.from); Uninstall puts the .conf back,
// byte for byte, and removes the list, when the list is still as Install
// wrote it.

// single reports whether b is a single-plugin configuration.
func single(b []byte) bool {
	fs, err := parseObject(b)
	if err != nil {
		return false
	}
	has := func(k string) bool { return slices.ContainsFunc(fs, func(f field) bool { return f.key == k }) }
	return !has("plugins") && has("type")
}

// listPath is the conflist Install makes from the .conf at path.
func listPath(path string) string {
	return strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
}

// installConf converts the single-plugin configuration orig at path into
// a conflist with the plugin chained, and removes path.
func installConf(path string, orig []byte, want json.RawMessage) (bool, error) {
	fs, err := parseObject(orig)
	if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	var list []field
	for _, k := range []string{"cniVersion", "name"} {
		if i := slices.IndexFunc(fs, func(f field) bool { return f.key == k }); i >= 0 {
			list = append(list, fs[i])
		}
	}
	var plugin bytes.Buffer
	if err := json.Compact(&plugin, orig); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	ps, _ := json.Marshal([]json.RawMessage{plugin.Bytes()})
	list = append(list, field{"plugins", ps})
	b, err := encodeObject(list)
	if err != nil {
		return false, err
	}
	out, _, err := chain(b, want)
	if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	lp := listPath(path)
	info, err := os.Stat(path)
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	if err := writeAtomic(backupPath(path, ".orig"), orig, 0o600); err != nil {
		return false, err
	}
	if err := writeAtomic(backupPath(lp, ".from"), []byte(filepath.Base(path)), 0o600); err != nil {
		return false, err
	}
	if err := writeAtomic(backupPath(lp, ".ours"), out, 0o600); err != nil {
		return false, err
	}
	if err := writeAtomic(lp, out, info.Mode().Perm()); err != nil {
		return false, err
	}
	if err := os.Remove(path); err != nil {
		return false, fmt.Errorf("remove %s (now %s): %w", path, lp, err)
	}
	return true, nil
}

// restoreConf puts back the .conf the conflist at list was made from, if
// Install made it from one and list is still as Install wrote it (cur):
// it writes the .conf and removes list. It reports whether it did.
func restoreConf(list string, cur []byte) (bool, error) {
	from, err := os.ReadFile(backupPath(list, ".from"))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	ours, errOurs := os.ReadFile(backupPath(list, ".ours"))
	conf := filepath.Join(filepath.Dir(list), filepath.Base(string(from)))
	orig, errOrig := os.ReadFile(backupPath(conf, ".orig"))
	if errOurs != nil || errOrig != nil || !bytes.Equal(cur, ours) {
		return false, nil
	}
	info, err := os.Stat(list)
	if err != nil {
		return false, err
	}
	if err := writeAtomic(conf, orig, info.Mode().Perm()); err != nil {
		return false, err
	}
	if err := os.Remove(list); err != nil {
		return false, fmt.Errorf("remove %s (%s restored): %w", list, conf, err)
	}
	return true, nil
}

// Package install puts meshsplice-cni on a Kubernetes node the way Istio's
// istio-cni does: it copies the plugin into the CNI bin dir and chains it
// at the end of the node's existing network configuration list (the file
// the runtime uses: the first *.conflist, *.conf or *.json of the conf dir
// by name; a single-plugin *.conf becomes a NAME.conflist, conf.go).
// Install is idempotent and repairs a conflist that the node's own CNI
// rewrote; Uninstall takes the entry out again and, when nobody
// touched the file since, restores it byte for byte from the copy Install
// kept in ConfDir/.meshsplice (a directory: runtimes skip it).
package install

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/meshsplice/meshsplice/cni"
)

// PluginType is the plugin's "type" in a conflist, and its binary's name.
const PluginType = "meshsplice-cni"

// backupDir holds, per conflist NAME, NAME.orig (the file before Install
// chained the plugin) and NAME.ours (the file as Install wrote it).
const backupDir = ".meshsplice"

// ErrNoConflist means the conf dir holds no network configuration list yet
// (the node's own CNI has not written it): Watch waits for one.
var ErrNoConflist = errors.New("no CNI network configuration list")

// Config says where the CNI files live and how the chained entry reads.
type Config struct {
	// ConfDir is the runtime's CNI conf dir (/etc/cni/net.d on the node).
	ConfDir string
	// BinDir is the CNI bin dir (/opt/cni/bin on the node).
	BinDir string
	// PluginSrc is the meshsplice-cni binary to copy into BinDir; empty:
	// do not copy.
	PluginSrc string
	// AgentSocket and AgentUnreachable are the plugin's agentSocket and
	// agentUnreachable fields (cni/README.md); empty: the plugin's default.
	AgentSocket, AgentUnreachable string
}

// entry is the plugin's entry, in the field order it is written.
type entry struct {
	Type             string          `json:"type"`
	AgentSocket      string          `json:"agentSocket,omitempty"`
	AgentUnreachable string          `json:"agentUnreachable,omitempty"`
	Capabilities     map[string]bool `json:"capabilities"`
}

func (c Config) entry() json.RawMessage {
	b, err := json.Marshal(entry{Type: PluginType, AgentSocket: c.AgentSocket, AgentUnreachable: c.AgentUnreachable,
		Capabilities: map[string]bool{"io.kubernetes.cri.pod-annotations": true}})
	if err != nil {
		panic(err) // a fixed struct of strings always marshals
	}
	return b
}

// Primary is the path of the conflist the runtime uses: libcni takes the
// first file by name with a CNI extension.
func Primary(confDir string) (string, error) {
	des, err := os.ReadDir(confDir)
	if err != nil {
		return "", fmt.Errorf("read CNI conf dir: %w", err)
	}
	for _, de := range des { // ReadDir sorts by name
		switch filepath.Ext(de.Name()) {
		case ".conflist", ".conf", ".json":
			if !de.IsDir() {
				return filepath.Join(confDir, de.Name()), nil
			}
		}
	}
	return "", fmt.Errorf("%s: %w", confDir, ErrNoConflist)
}

// Install copies the plugin and chains it into the primary conflist. It
// reports whether it changed the conflist; a second call with the same
// Config changes nothing.
func Install(c Config) (changed bool, err error) {
	if c.PluginSrc != "" {
		if err := copyPlugin(c.PluginSrc, filepath.Join(c.BinDir, PluginType)); err != nil {
			return false, err
		}
	}
	path, err := Primary(c.ConfDir)
	if err != nil {
		return false, err
	}
	// A conflist made from a .conf or .json that the node wrote again:
	// the runtime may take either by name (a .json sorts after the list),
	// the node's is the newer network.
	if from, err := os.ReadFile(backupPath(path, ".from")); err == nil {
		if src := filepath.Join(c.ConfDir, filepath.Base(string(from))); fileExists(src) {
			path = src
		}
	}
	orig, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("read conflist: %w", err)
	}
	want := c.entry()
	if filepath.Ext(path) != ".conflist" && single(orig) {
		return installConf(path, orig, want)
	}
	out, present, err := chain(orig, want)
	if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	if bytes.Equal(out, orig) {
		return false, nil
	}
	if !present { // orig is the node's own file: keep it for Uninstall
		if err := writeAtomic(backupPath(path, ".orig"), orig, 0o600); err != nil {
			return false, err
		}
	}
	if err := writeAtomic(backupPath(path, ".ours"), out, 0o600); err != nil {
		return false, err
	}
	info, err := os.Stat(path)
	if err != nil {
		return false, fmt.Errorf("stat conflist: %w", err)
	}
	if err := writeAtomic(path, out, info.Mode().Perm()); err != nil {
		return false, err
	}
	return true, nil
}

// Uninstall takes the plugin out of every conflist of the conf dir and
// removes the binary. A conflist still as Install wrote it gets its
// original bytes back; one rewritten since loses only the plugin's entry.
func Uninstall(c Config) error {
	des, err := os.ReadDir(c.ConfDir)
	if err != nil {
		return fmt.Errorf("read CNI conf dir: %w", err)
	}
	var errs []error
	for _, de := range des {
		if de.IsDir() || !slices.Contains([]string{".conflist", ".conf", ".json"}, filepath.Ext(de.Name())) {
			continue
		}
		if err := unchainFile(filepath.Join(c.ConfDir, de.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(filepath.Join(c.ConfDir, backupDir)); err != nil {
			errs = append(errs, err)
		}
		if c.BinDir != "" {
			if err := os.Remove(filepath.Join(c.BinDir, PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove plugin: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

func unchainFile(path string) error {
	cur, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read conflist: %w", err)
	}
	out, found, err := unchain(cur)
	if err != nil || !found {
		return nil // not a conflist we chained into: not ours to touch
	}
	if restored, err := restoreConf(path, cur); err != nil || restored {
		return err
	}
	ours, errOurs := os.ReadFile(backupPath(path, ".ours"))
	orig, errOrig := os.ReadFile(backupPath(path, ".orig"))
	if errOurs == nil && errOrig == nil && bytes.Equal(cur, ours) {
		out = orig
	}
	info, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat conflist: %w", err)
	}
	return writeAtomic(path, out, info.Mode().Perm())
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func backupPath(conflist, suffix string) string {
	return filepath.Join(filepath.Dir(conflist), backupDir, filepath.Base(conflist)+suffix)
}

// field is one member of a JSON object, kept in the file's order.
type field struct {
	key string
	val json.RawMessage
}

func parseObject(b []byte) ([]field, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	var fs []field
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return nil, err
		}
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return nil, err
		}
		fs = append(fs, field{t.(string), v})
	}
	if _, err := d.Token(); err != nil {
		return nil, err
	}
	if _, err := d.Token(); err == nil {
		return nil, errors.New("data after the JSON object")
	}
	return fs, nil
}

func encodeObject(fs []field) ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, f := range fs {
		if i > 0 {
			buf.WriteByte(',')
		}
		k, _ := json.Marshal(f.key)
		buf.Write(k)
		buf.WriteByte(':')
		buf.Write(f.val)
	}
	buf.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, buf.Bytes(), "", "  "); err != nil {
		return nil, err
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// plugins returns the conflist's fields, the index of "plugins" and its
// entries.
func plugins(b []byte) ([]field, int, []json.RawMessage, error) {
	fs, err := parseObject(b)
	if err != nil {
		return nil, 0, nil, err
	}
	i := slices.IndexFunc(fs, func(f field) bool { return f.key == "plugins" })
	if i < 0 {
		return nil, 0, nil, errors.New(`no "plugins": not a network configuration list`)
	}
	var ps []json.RawMessage
	if err := json.Unmarshal(fs[i].val, &ps); err != nil {
		return nil, 0, nil, fmt.Errorf("plugins: %w", err)
	}
	if len(ps) == 0 {
		return nil, 0, nil, errors.New("plugins is empty: nothing to chain after")
	}
	return fs, i, ps, nil
}

// checkVersion refuses a conflist whose cniVersion the plugin does not
// speak: chained there, it would fail every pod's ADD.
func checkVersion(fs []field) error {
	i := slices.IndexFunc(fs, func(f field) bool { return f.key == "cniVersion" })
	var v string
	if i >= 0 {
		if err := json.Unmarshal(fs[i].val, &v); err != nil {
			return fmt.Errorf("cniVersion: %w", err)
		}
	}
	if !slices.Contains(cni.SupportedVersions.SupportedVersions(), v) {
		return fmt.Errorf("cniVersion %q: meshsplice-cni speaks %s", v,
			strings.Join(cni.SupportedVersions.SupportedVersions(), ", "))
	}
	return nil
}

func isOurs(p json.RawMessage) bool {
	var t struct{ Type string }
	return json.Unmarshal(p, &t) == nil && t.Type == PluginType
}

// chain returns the conflist with want as its last plugin (the runtime
// calls it after the interface plugins, with their prevResult), and
// whether the plugin was there already. A conflist already as wanted is
// returned unchanged, byte for byte.
func chain(b []byte, want json.RawMessage) ([]byte, bool, error) {
	fs, i, ps, err := plugins(b)
	if err != nil {
		return nil, false, err
	}
	if err := checkVersion(fs); err != nil {
		return nil, false, err
	}
	j := slices.IndexFunc(ps, isOurs)
	present := j >= 0
	if j == len(ps)-1 && jsonEqual(ps[j], want) {
		return b, true, nil
	}
	if present {
		ps = slices.Delete(ps, j, j+1)
	}
	ps = append(ps, want)
	fs[i].val, _ = json.Marshal(ps)
	out, err := encodeObject(fs)
	return out, present, err
}

// unchain returns the conflist without the plugin, and whether it was in.
func unchain(b []byte) ([]byte, bool, error) {
	fs, i, ps, err := plugins(b)
	if err != nil {
		return nil, false, err
	}
	n := len(ps)
	ps = slices.DeleteFunc(ps, isOurs)
	if len(ps) == n {
		return b, false, nil
	}
	fs[i].val, _ = json.Marshal(ps)
	out, err := encodeObject(fs)
	return out, true, err
}

func jsonEqual(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x) // maps marshal with sorted keys
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

func copyPlugin(src, dst string) error {
	want, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read plugin: %w", err)
	}
	if have, err := os.ReadFile(dst); err == nil && sha256.Sum256(have) == sha256.Sum256(want) {
		return nil
	}
	return writeAtomic(dst, want, 0o755)
}

// writeAtomic writes b to path through a temporary file in the same
// directory, so a runtime never reads half a conflist. The temporary name
// starts with a dot and ends in .tmp: no runtime loads it.
func writeAtomic(path string, b []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+strings.TrimPrefix(filepath.Base(path), ".")+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

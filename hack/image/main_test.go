package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// makeImage runs make image into its own bin dir and returns the archive
// and the digest it printed.
func makeImage(tb testing.TB) ([]byte, string) {
	tb.Helper()
	bin := tb.TempDir()
	cmd := exec.Command("make", "-s", "-C", "../..", "image", "BIN="+bin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("make image: %v\n%s", err, out)
	}
	f := strings.Fields(string(out))
	if len(f) < 3 {
		tb.Fatalf("make image printed %q", out)
	}
	b, err := os.ReadFile(filepath.Join(bin, "meshsplice-image.tar"))
	if err != nil {
		tb.Fatal(err)
	}
	return b, f[len(f)-1]
}

// TestImageReproducible: make image twice gives the same archive, byte for
// byte, and so the same digest.
func TestImageReproducible(t *testing.T) {
	a, da := makeImage(t)
	b, db := makeImage(t)
	if da != db || !bytes.Equal(a, b) {
		t.Fatalf("two builds differ: %s (%d bytes) and %s (%d bytes)", da, len(a), db, len(b))
	}
	checkLayout(t, a, da)
	verifyGGCR(t, a)
}

// verifyGGCR has go-containerregistry (tools/ociverify) read and validate
// the archive: an implementation other than the one that wrote it.
func verifyGGCR(tb testing.TB, archive []byte) {
	tb.Helper()
	dir := tb.TempDir()
	untar(tb, bytes.NewReader(archive), dir, nil)
	out, err := ociverify(dir)
	if err != nil {
		tb.Fatalf("go-containerregistry rejects the image: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "linux/") || !strings.Contains(string(out), "ghcr.io/meshsplice/meshsplice:0.1.0") {
		tb.Errorf("ociverify printed %q", out)
	}
}

func ociverify(dir string) ([]byte, error) {
	return exec.Command("go", "run", "-C", "../../tools/ociverify", ".", dir).CombinedOutput()
}

// untar writes the archive's files under dir, each passed through edit
// first (if not nil).
func untar(tb testing.TB, r io.Reader, dir string, edit func([]byte) []byte) {
	tb.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			tb.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			tb.Fatal(err)
		}
		if edit != nil {
			b = edit(b)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			tb.Fatal(err)
		}
	}
}

// TestVerifyRejectsTampering: the verifier does catch a wrong layer.
func TestVerifyRejectsTampering(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "f")
	if err := os.WriteFile(f, []byte("x"), 0o755); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := Build(&buf, "example.com/x:1", []string{f}); err != nil {
		t.Fatal(err)
	}
	lay := t.TempDir()
	tampered := false
	untar(t, &buf, lay, func(b []byte) []byte {
		if bytes.HasPrefix(b, []byte{0x1f, 0x8b}) { // the gzipped layer
			b[len(b)-1] ^= 1
			tampered = true
		}
		return b
	})
	if !tampered {
		t.Fatal("no layer found to tamper with")
	}
	if out, err := ociverify(lay); err == nil {
		t.Fatalf("a tampered layer passed: %s", out)
	}
}

// checkLayout reads the archive as a runtime would: index.json names the
// manifest, every blob's name is its digest, the config's diff_id is the
// uncompressed layer's, and the layer holds the two executables.
func checkLayout(tb testing.TB, archive []byte, digest string) {
	tb.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			tb.Fatal(err)
		}
		files[h.Name], _ = io.ReadAll(tr)
	}
	for name, data := range files {
		if hex, ok := strings.CutPrefix(name, "blobs/sha256/"); ok && fmt.Sprintf("%x", sha256.Sum256(data)) != hex {
			tb.Errorf("blob %s holds other content", name)
		}
	}
	blob := func(d string) []byte {
		b, ok := files["blobs/sha256/"+strings.TrimPrefix(d, "sha256:")]
		if !ok {
			tb.Fatalf("no blob %s", d)
		}
		return b
	}
	var index struct {
		Manifests []struct {
			Digest      string
			Annotations map[string]string
		}
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		tb.Fatalf("index.json: %v %s", err, files["index.json"])
	}
	if m := index.Manifests[0]; m.Digest != digest || m.Annotations["io.containerd.image.name"] != "ghcr.io/meshsplice/meshsplice:0.1.0" {
		tb.Errorf("index names %s %v, want %s", m.Digest, m.Annotations, digest)
	}
	var manifest struct {
		Config struct{ Digest string }
		Layers []struct{ Digest string }
	}
	if err := json.Unmarshal(blob(digest), &manifest); err != nil || len(manifest.Layers) != 1 {
		tb.Fatalf("manifest: %v", err)
	}
	var config struct {
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		}
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &config); err != nil {
		tb.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	if err != nil {
		tb.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		tb.Fatal(err)
	}
	if d := fmt.Sprintf("sha256:%x", sha256.Sum256(raw)); len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != d {
		tb.Errorf("diff_ids %v, want [%s]", config.RootFS.DiffIDs, d)
	}
	var names []string
	lr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			tb.Fatal(err)
		}
		if h.Mode != 0o755 || h.Uid != 0 {
			tb.Errorf("%s: mode %o uid %d", h.Name, h.Mode, h.Uid)
		}
		names = append(names, h.Name)
	}
	if strings.Join(names, " ") != "meshsplice meshsplice-cni" {
		tb.Errorf("layer holds %v", names)
	}
}

func TestCut(t *testing.T) {
	for _, tc := range []struct{ ref, repo, tag string }{
		{"ghcr.io/meshsplice/meshsplice:0.1.0", "ghcr.io/meshsplice/meshsplice", "0.1.0"},
		{"localhost:5000/meshsplice:dev", "localhost:5000/meshsplice", "dev"},
		{"localhost:5000/meshsplice", "", ""},
		{"meshsplice", "", ""},
	} {
		repo, tag, ok := cut(tc.ref)
		if ok != (tc.repo != "") || repo != tc.repo || tag != tc.tag {
			t.Errorf("cut(%q) = %q %q %v", tc.ref, repo, tag, ok)
		}
	}
}

// Command image writes meshsplice's container image as an OCI archive (a
// tar of an OCI image layout), FROM scratch: one layer holding the given
// static binaries at /, no base image to download, no registry. The
// archive is reproducible: the same binaries give the same bytes and
// digest (fixed timestamps, owners and order; gzip without a name or
// time). containerd imports it: ctr images import --all-platforms FILE.
//
//	go run ./hack/image -o bin/meshsplice-image.tar -ref REF BINARY...
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// epoch is every timestamp in the image: 1970-01-01, as Bazel and ko do.
var epoch = time.Unix(0, 0).UTC()

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type blob struct {
	name string // blobs/sha256/HEX
	data []byte
	desc descriptor
}

func newBlob(mediaType string, data []byte) blob {
	sum := fmt.Sprintf("%x", sha256.Sum256(data))
	return blob{name: "blobs/sha256/" + sum, data: data,
		desc: descriptor{MediaType: mediaType, Digest: "sha256:" + sum, Size: int64(len(data))}}
}

// layer is a gzipped tar of the files, each at /BASENAME, mode 0755, root.
func layer(files []string) (compressed, diffID []byte, err error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	names := append([]string(nil), files...)
	sort.Slice(names, func(i, j int) bool { return filepath.Base(names[i]) < filepath.Base(names[j]) })
	for _, f := range names {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: filepath.Base(f), Mode: 0o755, Size: int64(len(data)),
			ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, nil, err
	}
	sum := sha256.Sum256(raw.Bytes())
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	zw.ModTime = epoch // header: no name, fixed time
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, nil, err
	}
	return gz.Bytes(), sum[:], nil
}

// Build writes the OCI archive of an image holding files to w, named ref
// (REPOSITORY:TAG), and returns the manifest's digest. Its entrypoint is
// /meshsplice.
func Build(w io.Writer, ref string, files []string) (string, error) {
	return BuildEntrypoint(w, ref, "/meshsplice", files)
}

// BuildEntrypoint is Build with another entrypoint (make e2e-node's test
// images: a pause program for the node's pod sandboxes).
func BuildEntrypoint(w io.Writer, ref, entrypoint string, files []string) (string, error) {
	repo, tag, ok := cut(ref)
	if !ok {
		return "", fmt.Errorf("image reference %q: want REPOSITORY:TAG", ref)
	}
	gz, diffID, err := layer(files)
	if err != nil {
		return "", fmt.Errorf("layer: %w", err)
	}
	l := newBlob("application/vnd.oci.image.layer.v1.tar+gzip", gz)
	config, err := json.Marshal(map[string]any{
		"created":      epoch.Format(time.RFC3339),
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": []string{entrypoint}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{fmt.Sprintf("sha256:%x", diffID)}},
		"history":      []map[string]any{{"created": epoch.Format(time.RFC3339), "created_by": "meshsplice hack/image"}},
	})
	if err != nil {
		return "", err
	}
	c := newBlob("application/vnd.oci.image.config.v1+json", config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        c.desc,
		"layers":        []descriptor{l.desc},
		"annotations":   map[string]string{"org.opencontainers.image.source": "https://github.com/meshsplice/meshsplice"},
	})
	if err != nil {
		return "", err
	}
	m := newBlob("application/vnd.oci.image.manifest.v1+json", manifest)
	md := m.desc
	md.Platform = &platform{Architecture: runtime.GOARCH, OS: "linux"}
	md.Annotations = map[string]string{
		"org.opencontainers.image.ref.name": tag,
		"io.containerd.image.name":          repo + ":" + tag, // the name ctr images import gives it
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests":     []descriptor{md},
	})
	if err != nil {
		return "", err
	}
	tw := tar.NewWriter(w)
	for _, f := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{c.name, c.data},
		{l.name, l.data},
		{m.name, m.data},
	} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644,
			Size: int64(len(f.data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return "", err
		}
		if _, err := tw.Write(f.data); err != nil {
			return "", err
		}
	}
	return m.desc.Digest, tw.Close()
}

// cut splits REPOSITORY:TAG at the last colon after the last slash.
func cut(ref string) (repo, tag string, ok bool) {
	i := strings.LastIndex(ref, ":")
	if i < 0 || strings.Contains(ref[i:], "/") {
		return "", "", false
	}
	return ref[:i], ref[i+1:], ref[:i] != "" && ref[i+1:] != ""
}

func main() {
	out := flag.String("o", "", "the OCI archive to write")
	ref := flag.String("ref", "", "the image's name, REPOSITORY:TAG")
	entrypoint := flag.String("entrypoint", "/meshsplice", "the image's entrypoint")
	flag.Parse()
	if *out == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: image -o FILE -ref REPOSITORY:TAG BINARY...")
		os.Exit(2)
	}
	var buf bytes.Buffer
	digest, err := BuildEntrypoint(&buf, *ref, *entrypoint, flag.Args())
	if err == nil {
		err = os.WriteFile(*out, buf.Bytes(), 0o644)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "image: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("%s %s %s\n", *out, *ref, digest)
}

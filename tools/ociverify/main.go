// Command ociverify checks an OCI image layout directory with
// go-containerregistry, an implementation independent of hack/image: every
// image of its index is read and validated (digests, sizes, diff_ids,
// config), as a registry client or containerd would. hack/image's test runs
// it on make image's archive. A module of its own, so go-containerregistry
// never enters meshsplice's go.mod:
//
//	go run -C tools/ociverify . DIR
package main

import (
	"fmt"
	"os"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: ociverify OCI-LAYOUT-DIR")
		os.Exit(2)
	}
	if err := verify(os.Args[1]); err != nil {
		fmt.Fprintf(os.Stderr, "ociverify: %v\n", err)
		os.Exit(1)
	}
}

func verify(dir string) error {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return err
	}
	if err := validate.Index(idx); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	for _, d := range m.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			return err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return err
		}
		fmt.Printf("%s %s/%s %s\n", d.Digest, cf.OS, cf.Architecture, d.Annotations["io.containerd.image.name"])
	}
	return nil
}

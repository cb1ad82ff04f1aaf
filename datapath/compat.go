package datapath

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/redirect"
	"github.com/meshsplice/meshsplice/sockops"
)

// ErrIncompatiblePins is returned by Open when the pin directory holds maps
// whose layout differs from this version's (another meshsplice version
// pinned them). Open then changes nothing: the running datapath stays
// attached and traffic keeps flowing on it.
var ErrIncompatiblePins = errors.New("pinned maps have another layout than this meshsplice version's")

// specHook, when set, changes the collection specs before anything is
// checked or loaded. Release builds leave it nil; the e2e upgrade tests
// build a second agent with -tags meshsplice_variant (variant.go) whose
// programs, or map layouts, differ as a next release's would.
var specHook func(spec *ebpf.CollectionSpec)

// loadSpec returns the spec that load gives, as this build loads it.
func loadSpec(load func() (*ebpf.CollectionSpec, error)) (*ebpf.CollectionSpec, error) {
	spec, err := load()
	if err != nil {
		return nil, err
	}
	if specHook != nil {
		specHook(spec)
	}
	return spec, nil
}

// checkPinnedMaps compares every pinned map this version would reuse with
// its spec, sized as loadObjects will load it (sizeMaps), before anything
// is loaded, created or attached, and names every difference. Map layouts are not migrated: moving between versions whose
// layouts differ takes `meshsplice uninstall` first.
func checkPinnedMaps(pinDir string, opts Options) error {
	var diffs []string
	seen := map[string]bool{}
	for _, load := range []func() (*ebpf.CollectionSpec, error){
		redirect.LoadCapture, sockops.LoadSplice, redirect.LoadTeardown, sockops.LoadReaders,
	} {
		spec, err := loadSpec(load)
		if err != nil {
			return fmt.Errorf("read program specs: %w", err)
		}
		sizeMaps(spec, mapDir(pinDir), opts)
		for name, ms := range spec.Maps {
			if ms.Pinning != ebpf.PinByName || seen[name] {
				continue
			}
			seen[name] = true
			pin := filepath.Join(mapDir(pinDir), name)
			m, err := ebpf.LoadPinnedMap(pin, nil)
			if errors.Is(err, fs.ErrNotExist) {
				continue // new in this version: created at load
			}
			if err != nil {
				diffs = append(diffs, fmt.Sprintf("%s: %v", name, err))
				continue
			}
			err = ms.Compatible(m)
			if err != nil {
				diffs = append(diffs, fmt.Sprintf("%s (%s)", name, strings.TrimSuffix(err.Error(), ": "+ebpf.ErrMapIncompatible.Error())))
			} else if d := layoutDiff(ms, m); d != "" {
				diffs = append(diffs, fmt.Sprintf("%s (%s)", name, d))
			}
			m.Close()
		}
	}
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s: %s; this agent changed nothing, the running datapath stays attached and traffic keeps flowing on it. "+
		"To move to this version run `meshsplice uninstall --pin-dir %s` (live connections go on over plain TCP, bytes queued on spliced sockets are delivered), then start this agent",
		ErrIncompatiblePins, mapDir(pinDir), strings.Join(diffs, ", "), pinDir)
}

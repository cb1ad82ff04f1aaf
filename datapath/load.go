package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshsplice/meshsplice/redirect"
	"github.com/meshsplice/meshsplice/sockops"
)

// Feature is a kernel capability meshsplice's programs need, with the
// first Linux release that has it (checked against the kernel's feature
// probes: cilium/ebpf and aya probe tests, docs.ebpf.io, bcc's
// kernel-versions.md). README.md has the same table for operators.
type Feature struct {
	Name     string `json:"name"`
	Programs []string
	Kernel   string `json:"kernel"`
	// Required: without it the agent does not start (and attaches
	// nothing, so traffic is untouched); otherwise Without says what the
	// agent does instead.
	Required bool   `json:"required"`
	Without  string `json:"without,omitempty"`
}

// Features are the program families, in load order.
var Features = []Feature{
	{Name: "cgroup/connect4 and cgroup/connect6 (outbound capture)", Programs: []string{"ms_connect4", "ms_connect6"},
		Kernel: "4.17 (bpf_get_netns_cookie there: 5.7)", Required: true},
	{Name: "cgroup/getsockopt (SO_ORIGINAL_DST for the sidecar)", Programs: []string{"ms_getsockopt"},
		Kernel: "5.3", Required: true},
	{Name: "sk_lookup (inbound capture and ingress policy)", Programs: []string{"ms_sk_lookup"},
		Kernel: "5.9", Required: true},
	{Name: "iter/tcp (sidecar listener registration)", Programs: []string{"ms_listener_iter"},
		Kernel: "5.9", Required: true},
	{Name: "sockops with socket storage and SOCKHASH (original destination keying, splice)", Programs: []string{"ms_sockops"},
		Kernel: "4.18 (sk_storage 5.2; bpf_get_netns_cookie in sockops 5.15)", Required: true},
	{Name: "sk_msg redirect (splice)", Programs: []string{"ms_sk_msg"},
		Kernel:  "4.17 (bpf_get_netns_cookie in sk_msg 5.15)",
		Without: "splice is off on this node: connections are captured and go through the sidecar over plain TCP"},
	{Name: "bpf_sock_destroy from iter/tcp (policy teardown)", Programs: []string{"ms_policy_teardown"},
		Kernel:  "6.5",
		Without: "live connections that a new policy forbids stay open until they close; new ones are judged"},
}

// ErrFeatureMissing wraps ebpf.ErrNotSupported for a kernel without a
// feature meshsplice needs; the message names the feature and the Linux
// release that has it.
type ErrFeatureMissing struct {
	Feature Feature
	Err     error
}

func (e *ErrFeatureMissing) Error() string {
	return fmt.Sprintf("this kernel cannot load %s (needs Linux >= %s): %v", e.Feature.Name, e.Feature.Kernel, e.Err)
}

func (e *ErrFeatureMissing) Unwrap() []error { return []error{ebpf.ErrNotSupported, e.Err} }

// featureOf returns the feature a program belongs to.
func featureOf(program string) Feature {
	for _, f := range Features {
		for _, p := range f.Programs {
			if p == program {
				return f
			}
		}
	}
	return Feature{Name: program, Kernel: "6.1", Required: true}
}

// loadObjects loads the maps and programs objs names (a bpf2go objects
// struct, or a struct of some of their fields) from spec:
//   - a map pinned by an earlier run keeps its size when it is a hash
//     (its entries are what live connections depend on); arrays and rings
//     follow the program's size;
//   - opts.MaxEntries sizes maps created now (tests fill small maps);
//   - opts.RefuseProgram plays a kernel that refuses a program.
//
// A program the kernel refuses comes back as *ErrFeatureMissing.
func loadObjects(spec func() (*ebpf.CollectionSpec, error), objs any, load *ebpf.CollectionOptions, opts Options) error {
	cs, err := loadSpec(spec)
	if err != nil {
		return err
	}
	sizeMaps(cs, load.Maps.PinPath, opts)
	for _, prog := range programNames(objs) {
		if opts.RefuseProgram == nil {
			break
		}
		if err := opts.RefuseProgram(prog); err != nil {
			return &ErrFeatureMissing{Feature: featureOf(prog), Err: fmt.Errorf("load %s: %w", prog, err)}
		}
	}
	err = cs.LoadAndAssign(objs, load)
	var ve *ebpf.VerifierError
	if errors.Is(err, ebpf.ErrNotSupported) && !errors.As(err, &ve) {
		for _, prog := range programNames(objs) {
			if _, ok := cs.Programs[prog]; ok && errorNames(err, prog) {
				return &ErrFeatureMissing{Feature: featureOf(prog), Err: err}
			}
		}
	}
	return err
}

// sizeMaps sets the sizes cs's maps are loaded with: opts.MaxEntries for
// maps created now, and a hash map pinned by an earlier run keeps its size
// (see loadObjects). checkPinnedMaps compares pins with the same sizes.
func sizeMaps(cs *ebpf.CollectionSpec, pinPath string, opts Options) {
	for name, ms := range cs.Maps {
		if n, ok := opts.MaxEntries[name]; ok {
			ms.MaxEntries = n
		}
		if !resizable(ms.Type) {
			continue
		}
		if m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, name), nil); err == nil {
			ms.MaxEntries = m.MaxEntries()
			m.Close()
		}
	}
}

func resizable(t ebpf.MapType) bool {
	switch t {
	case ebpf.Hash, ebpf.LRUHash, ebpf.SockHash, ebpf.LPMTrie:
		return true
	}
	return false
}

// errorNames tells whether a load error is about program prog.
func errorNames(err error, prog string) bool {
	return regexp.MustCompile(`\b` + regexp.QuoteMeta(prog) + `\b`).MatchString(err.Error())
}

// programNames lists the `ebpf:"name"` tags of the *ebpf.Program fields of
// objs, embedded structs included.
func programNames(objs any) []string {
	var names []string
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		t := v.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			switch {
			case f.Type == reflect.TypeFor[*ebpf.Program]():
				if tag := f.Tag.Get("ebpf"); tag != "" {
					names = append(names, tag)
				}
			case f.Type.Kind() == reflect.Struct:
				walk(v.Field(i))
			}
		}
	}
	walk(reflect.ValueOf(objs).Elem())
	return names
}

// spliceCore is the splice object without its sk_msg program: what a
// kernel that refuses sk_msg still runs.
type spliceCore struct {
	sockops.SpliceMaps
	MsSockops *ebpf.Program `ebpf:"ms_sockops"`
}

// loadPrograms loads the capture and splice objects. A kernel without an
// optional feature (sk_msg) gets the rest, and d.missing says what is off;
// a missing required feature is an *ErrFeatureMissing.
func (d *Datapath) loadPrograms(load *ebpf.CollectionOptions, opts Options) error {
	if err := loadObjects(redirect.LoadCapture, &d.capture, load, opts); err != nil {
		return fmt.Errorf("load capture programs: %w", explainLoad(err))
	}
	err := loadObjects(sockops.LoadSplice, &d.splice, load, opts)
	var fm *ErrFeatureMissing
	if !errors.As(err, &fm) || fm.Feature.Required {
		if err != nil {
			return fmt.Errorf("load splice programs: %w", explainLoad(err))
		}
		return nil
	}
	var core spliceCore
	if err := loadObjects(sockops.LoadSplice, &core, load, opts); err != nil {
		return fmt.Errorf("load splice programs without %s: %w", fm.Feature.Name, explainLoad(err))
	}
	d.splice.SpliceMaps, d.splice.MsSockops = core.SpliceMaps, core.MsSockops
	d.missing = append(d.missing, fm)
	d.log.Warn("kernel feature missing; running without it", "feature", fm.Feature.Name,
		"needs_linux", fm.Feature.Kernel, "effect", fm.Feature.Without, "error", fm.Err)
	return nil
}

// attachSkMsg attaches the splice program to ms_socks and pins it; a
// kernel without sk_msg runs with splice off (loadPrograms).
func (d *Datapath) attachSkMsg() error {
	if d.spliceMissing() {
		// An earlier agent's program stays attached to the map unless
		// detached here: nothing would detach it later.
		if err := detachSkMsg(d.pinDir, d.splice.MsSocks); err != nil {
			return err
		}
		os.Remove(skMsgPin(d.pinDir))
		return nil
	}
	// sk_msg first: a socket picks up the map's programs only when it is
	// added, so the program must be there before sockops adds any.
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  d.splice.MsSocks.FD(),
		Program: d.splice.MsSkMsg,
		Attach:  ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return fmt.Errorf("attach sk_msg to ms_socks: %w", err)
	}
	// Pin the program: Detach needs it, and it replaces the previous one.
	os.Remove(skMsgPin(d.pinDir))
	if err := d.splice.MsSkMsg.Pin(skMsgPin(d.pinDir)); err != nil {
		return fmt.Errorf("pin sk_msg: %w", err)
	}
	return nil
}

// MissingFeatures lists the optional kernel features this datapath runs
// without.
func (d *Datapath) MissingFeatures() []Feature {
	out := make([]Feature, len(d.missing))
	for i, m := range d.missing {
		out[i] = m.Feature
	}
	return out
}

// spliceMissing tells whether the kernel refused the splice program.
func (d *Datapath) spliceMissing() bool { return d.splice.MsSkMsg == nil }

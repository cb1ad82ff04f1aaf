package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/policy"
)

// State files (pods.json, identities.json) are written so that a crash or a
// power cut leaves either the old file or the new one, never a torn one: the
// data reaches the disk (fsync) before the rename makes it the file, and the
// rename reaches the disk (fsync of the directory) before the caller goes
// on. A file that is corrupt all the same (a disk error, a hand edit) does
// not stop the agent: it is moved aside as <name>.corrupt-<unix time>, the
// agent says so, and it rebuilds what it can from the kernel (see
// recoverPods and loadIdentities).

// writeFileSync replaces path with data atomically and durably.
func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer dir.Close()
	if err := dir.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", filepath.Dir(path), err)
	}
	return nil
}

// quarantine moves a corrupt state file aside and returns its new name.
func quarantine(path string) (string, error) {
	aside := path + ".corrupt-" + strconv.FormatInt(time.Now().Unix(), 10)
	if err := os.Rename(path, aside); err != nil {
		return "", fmt.Errorf("move corrupt %s aside: %w", path, err)
	}
	return aside, nil
}

// errCorrupt marks a state file that exists but cannot be parsed.
var errCorrupt = errors.New("corrupt state file")

// identityFloor starts a fresh allocator above every identity number the
// kernel holds: the identities of an earlier agent are lost, and a number
// given anew must not mean, to a policy still in the kernel, a workload it
// was not written for. The next policy the agent installs uses the new
// numbers throughout.
func identityFloor(ids *policy.Allocator, kernel []datapath.Pod) error {
	var highest uint64
	for _, kp := range kernel {
		highest = max(highest, uint64(kp.Identity))
	}
	if highest == 0 {
		return nil
	}
	state := fmt.Sprintf(`{"version": 1, "next": %d, "identities": {}}`, highest+1)
	return ids.Load(bytes.NewReader([]byte(state)))
}

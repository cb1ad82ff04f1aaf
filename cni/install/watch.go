package install

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Resync is how often Watch re-checks even without a file event (a
// removed plugin binary in BinDir, an event the kernel dropped).
const Resync = 30 * time.Second

// Watch installs, then keeps the installation in place: every change in
// the conf dir (the node's CNI rewriting its conflist, a new conflist)
// re-runs Install, which rewrites only what is missing. It returns when
// ctx ends; it does not uninstall (the caller decides).
func Watch(ctx context.Context, c Config, log *slog.Logger) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close()
	if _, err := unix.InotifyAddWatch(fd, c.ConfDir,
		unix.IN_CREATE|unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO|unix.IN_DELETE|unix.IN_MOVED_FROM); err != nil {
		return fmt.Errorf("watch %s: %w", c.ConfDir, err)
	}
	events := make(chan error, 1)
	go func() {
		buf := make([]byte, 64*1024)
		for {
			_, err := f.Read(buf) // one read drains a burst of events
			select {
			case events <- err:
			default: // a check is pending already
			}
			if err != nil {
				return
			}
		}
	}()
	tick := time.NewTicker(Resync)
	defer tick.Stop()
	for {
		changed, err := Install(c)
		switch {
		case errors.Is(err, ErrNoConflist):
			log.Info("waiting for the node's CNI conflist", "conf_dir", c.ConfDir)
		case err != nil:
			log.Error("chain meshsplice-cni", "err", err)
		case changed:
			log.Info("chained meshsplice-cni into the node's conflist", "conf_dir", c.ConfDir)
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-events:
			if err != nil {
				return fmt.Errorf("inotify: %w", err)
			}
		case <-tick.C:
		}
	}
}

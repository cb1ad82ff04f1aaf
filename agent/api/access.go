package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Who may register pods, and how much a request may cost the agent.
//
// The socket is bound inside a private directory (mode 0700) next to its
// path, given its mode (0600, owned by root or by the allowed uid) and only
// then renamed into place: there is no moment at which another user can
// connect, whatever the umask. Every connection's peer credentials
// (SO_PEERCRED) are checked as well: root, or the one uid allowed with
// [AllowUID]; anyone else gets 403 forbidden. Request headers, bodies and
// the time to send them are bounded (maxBodyBytes, [DefaultLimits]).

// ErrForbidden: the peer's uid may not use the API (403).
var ErrForbidden = errors.New("forbidden")

// CodeForbidden is the error code of ErrForbidden.
const CodeForbidden = "forbidden"

// Limits bound one connection to the API.
type Limits struct {
	// ReadTimeout bounds reading a request, body included.
	ReadTimeout time.Duration
	// WriteTimeout bounds handling a request and writing its answer (a
	// registration enters the pod's netns and writes the kernel maps).
	WriteTimeout time.Duration
	// IdleTimeout closes a kept-alive connection that sends nothing.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds the request line and headers.
	MaxHeaderBytes int
}

// DefaultLimits are the limits of Listen.
var DefaultLimits = Limits{ReadTimeout: 10 * time.Second, WriteTimeout: 60 * time.Second,
	IdleTimeout: 60 * time.Second, MaxHeaderBytes: 64 << 10}

// Option configures Listen.
type Option func(*listenOptions)

type listenOptions struct {
	uid    int // -1: root only
	limits Limits
}

// AllowUID lets uid use the API besides root: the socket is owned by uid
// (mode 0600) and connections from uid pass the peer check. A negative uid
// (or 0) allows root only.
func AllowUID(uid int) Option {
	return func(o *listenOptions) { o.uid = uid }
}

// WithLimits replaces DefaultLimits; zero fields keep their default.
func WithLimits(l Limits) Option {
	return func(o *listenOptions) {
		if l.ReadTimeout > 0 {
			o.limits.ReadTimeout = l.ReadTimeout
		}
		if l.WriteTimeout > 0 {
			o.limits.WriteTimeout = l.WriteTimeout
		}
		if l.IdleTimeout > 0 {
			o.limits.IdleTimeout = l.IdleTimeout
		}
		if l.MaxHeaderBytes > 0 {
			o.limits.MaxHeaderBytes = l.MaxHeaderBytes
		}
	}
}

// afterBind, when set (tests), runs once the socket is bound and listening
// in its private directory, before it is renamed into place.
var afterBind func(tmpSocket string)

// listenPrivate binds a unix socket at path with no window in which anyone
// but root (and uid, if >0) can connect: it is bound in a fresh 0700
// directory beside path, restricted, and then renamed to path.
func listenPrivate(path string, uid int) (*net.UnixListener, error) {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".bind-")
	if err != nil {
		return nil, fmt.Errorf("create private bind directory: %w", err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("restrict %s: %w", dir, err)
	}
	tmp := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The socket file moves: Close must not unlink the temporary name.
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (*net.UnixListener, error) {
		ln.Close()
		return nil, err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(fmt.Errorf("restrict %s: %w", path, err))
	}
	if uid > 0 {
		if err := os.Chown(tmp, uid, -1); err != nil {
			return fail(fmt.Errorf("give %s to uid %d: %w", path, uid, err))
		}
	}
	if afterBind != nil {
		afterBind(tmp)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("move socket into place at %s: %w", path, err))
	}
	return ln, nil
}

// removeOwnSocket removes path if it is still the socket file st described.
func removeOwnSocket(path string, st os.FileInfo) {
	if st == nil {
		return
	}
	if cur, err := os.Lstat(path); err == nil && os.SameFile(cur, st) {
		os.Remove(path)
	}
}

// peerKey is the context key of a connection's peer credentials.
type peerKey struct{}

// peerCred reads the connecting process's credentials (SO_PEERCRED, taken
// by the kernel at connect) into the connection's context.
func peerCred(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, cred)
}

// requirePeer answers 403 to a peer that is neither root nor uid (when
// uid > 0), and to one whose credentials are unknown.
func (h *handler) requirePeer(uid int, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cred, _ := r.Context().Value(peerKey{}).(*syscall.Ucred)
		allowed := []string{"root"}
		if uid > 0 {
			allowed = append(allowed, "uid "+strconv.Itoa(uid))
		}
		switch {
		case cred == nil:
			h.fail(w, r, http.StatusForbidden, CodeForbidden, "peer credentials unknown: only a local process may register pods")
		case cred.Uid == 0 || (uid > 0 && cred.Uid == uint32(uid)):
			next.ServeHTTP(w, r)
		default:
			h.fail(w, r, http.StatusForbidden, CodeForbidden, fmt.Sprintf(
				"%v: peer uid %d (pid %d) may not use the registration API (allowed: %v)", ErrForbidden, cred.Uid, cred.Pid, allowed))
		}
	})
}

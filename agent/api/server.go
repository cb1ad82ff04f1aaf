package api

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Server serves the API on a unix socket.
type Server struct {
	path string
	st   os.FileInfo // the socket file, removed on Shutdown/Close if still ours
	ln   *net.UnixListener
	srv  *http.Server
}

// Listen creates the API socket at path (mode 0600, bound where nobody else
// can reach it before it has its mode: see access.go; the directory is
// created with mode 0755 if needed) and returns a server for reg, ready to
// Serve. Only root, or the uid of AllowUID, may use it. A stale socket left
// by a crashed agent is replaced; a socket on which another process still
// answers is an error.
func Listen(path string, reg Registry, log *slog.Logger, opts ...Option) (*Server, error) {
	o := listenOptions{limits: DefaultLimits}
	for _, opt := range opts {
		opt(&o)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	ln, err := listenPrivate(path, o.uid)
	if err != nil {
		return nil, err
	}
	st, _ := os.Lstat(path)
	guard := &handler{log: log}
	return &Server{
		path: path,
		st:   st,
		ln:   ln,
		srv: &http.Server{
			Handler:           guard.requirePeer(o.uid, NewHandler(reg, log)),
			ConnContext:       peerCred,
			ReadHeaderTimeout: o.limits.ReadTimeout,
			ReadTimeout:       o.limits.ReadTimeout,
			WriteTimeout:      o.limits.WriteTimeout,
			IdleTimeout:       o.limits.IdleTimeout,
			MaxHeaderBytes:    o.limits.MaxHeaderBytes,
		},
	}, nil
}

// Path returns the socket path.
func (s *Server) Path() string { return s.path }

// Serve answers requests until Shutdown or Close, and then returns nil.
func (s *Server) Serve() error {
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", s.path, err)
	}
	return nil
}

// Shutdown stops accepting requests, waits for the running ones until ctx
// is done, and removes the socket.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	// Serve may never have run: close the listener ourselves. Closing
	// twice is harmless.
	s.ln.Close()
	removeOwnSocket(s.path, s.st)
	if err != nil {
		return fmt.Errorf("shut down %s: %w", s.path, err)
	}
	return nil
}

// Close stops the server at once and removes the socket.
func (s *Server) Close() error {
	err := s.srv.Close()
	s.ln.Close()
	removeOwnSocket(s.path, s.st)
	if err != nil {
		return fmt.Errorf("close %s: %w", s.path, err)
	}
	return nil
}

// removeStaleSocket removes a socket at path that nobody listens on.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another process is listening (is another meshsplice agent running?)", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

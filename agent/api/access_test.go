package api_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/agent/api/apitest"
)

// nobody is the uid of an unprivileged local process in these tests.
const nobody = 65534

func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: connects as another uid")
	}
}

// openSocketDir is a socket directory every user may traverse, so that the
// socket's own mode and the peer check are what decide.
func openSocketDir(tb testing.TB) string {
	tb.Helper()
	path := socketPath(tb)
	if err := os.Chmod(filepath.Dir(path), 0o755); err != nil {
		tb.Fatal(err)
	}
	return path
}

// dialAs connects to the unix socket at path from a thread whose uid is
// uid (setresuid on that thread only; the thread is thrown away after).
// SO_PEERCRED records the uid of the connecting thread.
func dialAs(tb testing.TB, path string, uid int) (net.Conn, error) {
	tb.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, uintptr(uid), uintptr(uid), uintptr(uid)); e != 0 {
			done <- result{err: fmt.Errorf("setresuid: %w", e)}
			return
		}
		fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			done <- result{err: err}
			return
		}
		if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
			syscall.Close(fd)
			done <- result{err: err}
			return
		}
		f := os.NewFile(uintptr(fd), path)
		c, err := net.FileConn(f)
		f.Close()
		done <- result{c, err}
	}()
	r := <-done
	if r.c != nil {
		tb.Cleanup(func() { r.c.Close() })
	}
	return r.c, r.err
}

// get sends GET path on c and returns the answer.
func get(tb testing.TB, c net.Conn, path string) *http.Response {
	tb.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: meshsplice\r\n\r\n", path); err != nil {
		tb.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { resp.Body.Close() })
	return resp
}

func listen(tb testing.TB, path string, opts ...api.Option) *api.Server {
	tb.Helper()
	srv, err := api.Listen(path, &apitest.MemRegistry{}, nil, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve()
	tb.Cleanup(func() { srv.Close() })
	return srv
}

// TestSocketNeverConnectableByOthers: with umask 0 (the worst case), the
// socket is unreachable for another uid while it is bound and listening in
// its private directory, does not exist at its path before it has its mode,
// and is 0600 root-owned once in place.
func TestSocketNeverConnectableByOthers(t *testing.T) {
	requireRoot(t)
	path := openSocketDir(t)
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	var checked bool
	defer api.SetAfterBind(func(tmp string) {
		checked = true
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket at %s before it has its mode: %v", path, err)
		}
		fi, err := os.Stat(filepath.Dir(tmp))
		if err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("bind directory %v (%v), want mode 0700", fi.Mode().Perm(), err)
		}
		if _, err := dialAs(t, tmp, nobody); !errors.Is(err, syscall.EACCES) {
			t.Errorf("uid %d connecting to the socket while it is being set up: %v, want EACCES", nobody, err)
		}
	})()
	listen(t, path)
	if !checked {
		t.Fatal("the bind hook never ran")
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o600 || st.Uid != 0 {
		t.Errorf("socket mode %v uid %d, want 0600 root", fi.Mode().Perm(), st.Uid)
	}
	if _, err := dialAs(t, path, nobody); !errors.Is(err, syscall.EACCES) {
		t.Errorf("uid %d connecting: %v, want EACCES", nobody, err)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".bind-*")); len(left) != 0 {
		t.Errorf("bind directories left behind: %v", left)
	}
}

// TestPeerCredentials: SO_PEERCRED decides, whatever the socket's mode:
// root passes, another uid gets 403 naming its uid, and the uid of
// AllowUID may connect (the socket is its) and pass.
func TestPeerCredentials(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name       string
		opts       []api.Option
		loosen     bool // chmod 0666: only the peer check stands in the way
		uid        int
		wantStatus int
	}{
		{"root", nil, false, 0, http.StatusOK},
		{"other uid, socket opened up", nil, true, nobody, http.StatusForbidden},
		{"allowed uid", []api.Option{api.AllowUID(nobody)}, false, nobody, http.StatusOK},
		{"allowed uid, root still passes", []api.Option{api.AllowUID(nobody)}, false, 0, http.StatusOK},
		{"another uid than the allowed one", []api.Option{api.AllowUID(nobody - 1)}, true, nobody, http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := openSocketDir(t)
			listen(t, path, tc.opts...)
			if tc.loosen {
				if err := os.Chmod(path, 0o666); err != nil {
					t.Fatal(err)
				}
			}
			c, err := dialAs(t, path, tc.uid)
			if err != nil {
				t.Fatalf("connect as uid %d: %v", tc.uid, err)
			}
			resp := get(t, c, "/v1/health")
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.wantStatus {
				t.Fatalf("uid %d: HTTP %d %s, want %d", tc.uid, resp.StatusCode, body, tc.wantStatus)
			}
			if tc.wantStatus == http.StatusForbidden && !strings.Contains(string(body), fmt.Sprintf("peer uid %d", tc.uid)) {
				t.Errorf("403 body %s does not name the peer's uid", body)
			}
		})
	}
	t.Run("client error matches ErrForbidden", func(t *testing.T) {
		path := openSocketDir(t)
		listen(t, path, api.AllowUID(nobody-1))
		// The client runs as root: open the answer path by asking as
		// nobody through a raw connection instead.
		os.Chmod(path, 0o666)
		c, err := dialAs(t, path, nobody)
		if err != nil {
			t.Fatal(err)
		}
		resp := get(t, c, "/v1/pods/c1")
		var e api.Error
		if err := decodeJSON(resp.Body, &e); err != nil {
			t.Fatal(err)
		}
		if !errors.Is(&e, api.ErrForbidden) {
			t.Errorf("error %+v does not match ErrForbidden", e)
		}
	})
}

// TestRequestBounds: an oversized body, oversized headers and a client that
// stops sending mid-request are all cut off.
func TestRequestBounds(t *testing.T) {
	path := socketPath(t)
	listen(t, path, api.WithLimits(api.Limits{ReadTimeout: 300 * time.Millisecond, MaxHeaderBytes: 4 << 10}))
	dial := func(t *testing.T) net.Conn {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		return c
	}
	t.Run("body over 1 MiB", func(t *testing.T) {
		c := dial(t)
		body := `{"containerID":"` + strings.Repeat("a", 2<<20) + `"}`
		go fmt.Fprintf(c, "POST /v1/pods HTTP/1.1\r\nHost: m\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "larger than") {
			t.Errorf("HTTP %d %s, want 400 naming the size limit", resp.StatusCode, b)
		}
	})
	t.Run("headers over the limit", func(t *testing.T) {
		c := dial(t)
		go fmt.Fprintf(c, "GET /v1/health HTTP/1.1\r\nHost: m\r\nX-Big: %s\r\n\r\n", strings.Repeat("x", 64<<10))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("HTTP %d, want 431", resp.StatusCode)
		}
	})
	for _, tc := range []struct{ name, partial string }{
		{"stalled headers", "GET /v1/health HTTP/1.1\r\nHost: m\r\n"},
		{"stalled body", "POST /v1/pods HTTP/1.1\r\nHost: m\r\nContent-Length: 1000\r\n\r\n{\"containerID\":"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t)
			if _, err := io.WriteString(c, tc.partial); err != nil {
				t.Fatal(err)
			}
			// The server gives up on the request and closes the
			// connection (after an error answer, or none).
			_, err := io.ReadAll(c)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the server kept a stalled request open")
			}
		})
	}
}

func decodeJSON(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }

// Command mstest holds the test programs of meshsplice's end-to-end tests:
// a minimal Envoy-like sidecar, TCP echo servers reading their sockets in
// different ways (read(2), splice(2), FIONREAD polling), a sink, and a
// verifying client that doubles as the load generator of meshsplice bench
// (client --duration: see load.go).
//
// Usage:
//
//	mstest sidecar [--outbound-port 15001] [--inbound-port 15006] [--listen-v4only]
//	mstest echo --port P
//	mstest splice-server --port P
//	mstest fionread-server --port P
//	mstest sink --port P
//	mstest client --target IP:PORT [--messages N] [--size S] [--pipelined] [--conns C] ...
//	mstest client --target IP:PORT --duration D [--warmup W] [--rate R] [--stream|--reconnect] [--cpu-stat ROLE=DIR]...
//	mstest window --cpu-stat ROLE=DIR... --start PREFIX --end PREFIX -- PROGRAM [ARGS...]
//	mstest reader --port P --read read|recv|recvmsg|splice|iocopy|fionread
//	mstest send --target IP:PORT --write write|sendfile|splice --bytes N
//
// Every subcommand prints one JSON object per line on standard output, one
// per event, each with an "event" field, and diagnostics on standard error
// (window prints its events on standard error: standard output is its
// program's).
// Run a subcommand with -h for its flags.
//
// No code path copies between two TCP connections with io.Copy, ReadFrom or
// WriteTo: Go would use splice(2) for that, which changes the kernel paths
// under test. Data is moved with explicit Read/Write loops, except in
// splice-server, reader, send and sidecar --copy iocopy, which use splice(2),
// sendfile(2) or io.Copy on purpose.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	cmds := map[string]func(args []string) int{
		"sidecar":         runSidecar,
		"echo":            runEcho,
		"splice-server":   runSpliceServer,
		"fionread-server": runFionreadServer,
		"sink":            runSink,
		"client":          runClient,
		"window":          runWindow,
		"reader":          runReader,
		"send":            runSend,
		"respond-close":   runRespondClose,
		"request":         runRequest,
	}
	cmd, ok := cmds[os.Args[1]]
	if !ok {
		if os.Args[1] != "-h" && os.Args[1] != "--help" && os.Args[1] != "help" {
			fmt.Fprintf(os.Stderr, "mstest: unknown subcommand %q\n", os.Args[1])
		}
		usage()
		os.Exit(2)
	}
	os.Exit(cmd(os.Args[2:]))
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: mstest SUBCOMMAND [flags]

subcommands:
  sidecar          Envoy-like test sidecar (outbound 15001, inbound 15006)
  echo             TCP echo server (read/write loop)
  splice-server    TCP echo server reading with splice(2)
  fionread-server  TCP echo server polling ioctl(FIONREAD) before reads
  sink             TCP server that discards what it reads and answers the byte count at EOF
  client           verifying client for the echo servers
  window           run a load generator, reading cgroups' CPU time at its window's edges
  reader           server reading a stream with read, recv, recvmsg, splice, io.Copy or FIONREAD+read
  send             client writing a stream with write, sendfile or splice, checking the reader's CRC
  respond-close    server that answers and closes with unread input or SO_LINGER 0 (RST)
  request          client for respond-close: must read the whole answer

Run "mstest SUBCOMMAND -h" for its flags.`)
}

// out serialises JSON event lines on standard output.
var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: newEncoder()}

func newEncoder() *json.Encoder {
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	return enc
}

// emit prints one event as a JSON line.
func emit(ev any) {
	out.Lock()
	defer out.Unlock()
	if err := out.enc.Encode(ev); err != nil {
		fmt.Fprintf(os.Stderr, "mstest: write event: %v\n", err)
	}
}

// logf prints a diagnostic on standard error.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mstest: "+format+"\n", args...)
}

// errorEvent is printed when something fails.
type errorEvent struct {
	Event    string `json:"event"` // "error"
	Listener string `json:"listener,omitempty"`
	ID       uint64 `json:"id,omitempty"`
	Stage    string `json:"stage"`
	Error    string `json:"error"`
	Errno    string `json:"errno,omitempty"`
	Peer     string `json:"peer,omitempty"`
	Local    string `json:"local,omitempty"`
	OrigDst  string `json:"orig_dst,omitempty"`
}

// addrString formats a connection address as ip:port with IPv4-mapped IPv6
// addresses unmapped ("10.1.0.2:80", "[fd00:1::2]:80").
func addrString(a net.Addr) string {
	ap, ok := addrPort(a)
	if !ok {
		if a == nil {
			return ""
		}
		return a.String()
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

// addrPort returns a TCP address as netip.AddrPort, keeping an IPv4-mapped
// IPv6 address mapped.
func addrPort(a net.Addr) (netip.AddrPort, bool) {
	t, ok := a.(*net.TCPAddr)
	if !ok || t == nil {
		return netip.AddrPort{}, false
	}
	return t.AddrPort(), true
}

// isV4Mapped reports whether a is an IPv4-mapped IPv6 address, as seen on
// IPv4 connections accepted by a dual-stack socket.
func isV4Mapped(a net.Addr) bool {
	ap, ok := addrPort(a)
	return ok && ap.Addr().Is4In6()
}

// listenAddr returns the address to listen on for port: "[::]:port"
// (dual-stack) or "0.0.0.0:port" when v4only is set.
func listenAddr(port int, v4only bool) (network, addr string) {
	if v4only {
		return "tcp4", fmt.Sprintf("0.0.0.0:%d", port)
	}
	return "tcp", fmt.Sprintf("[::]:%d", port)
}

// parseFlags parses args; when it returns ok false the subcommand should
// exit with code (0 after -h, 2 on a usage error).
func parseFlags(fs *flag.FlagSet, args []string) (code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "mstest %s: unexpected arguments %q\n", fs.Name(), fs.Args())
		return 2, false
	}
	return 0, true
}

// errnoName returns the symbolic name ("ENOENT") of the errno wrapped in
// err, or "".
func errnoName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return ""
}

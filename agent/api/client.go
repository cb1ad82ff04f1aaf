package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// DefaultTimeout bounds one client call when the Client was given none.
const DefaultTimeout = 10 * time.Second

// Client calls the API of the agent listening on a unix socket. Its methods
// are safe for concurrent use.
type Client struct {
	socket  string
	timeout time.Duration
	http    *http.Client
}

// NewClient returns a client for the agent listening at socket. timeout
// bounds each call, connecting included, on top of the caller's context;
// zero means DefaultTimeout.
func NewClient(socket string, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    2,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socket, timeout: timeout, http: &http.Client{Transport: tr}}
}

// Socket returns the socket path the client connects to.
func (c *Client) Socket() string { return c.socket }

// Close releases idle connections.
func (c *Client) Close() {
	c.http.CloseIdleConnections()
}

// AddPod registers a pod (CNI ADD).
func (c *Client) AddPod(ctx context.Context, req PodRegistration) (PodStatus, error) {
	var st PodStatus
	if err := c.do(ctx, http.MethodPost, "/v1/pods", req, &st); err != nil {
		return PodStatus{}, err
	}
	return st, nil
}

// CheckPod returns the agent's registration of a container (CNI CHECK). An
// unknown container is an error matching ErrPodNotFound.
func (c *Client) CheckPod(ctx context.Context, containerID string) (PodStatus, error) {
	var st PodStatus
	if err := c.do(ctx, http.MethodGet, "/v1/pods/"+url.PathEscape(containerID), nil, &st); err != nil {
		return PodStatus{}, err
	}
	return st, nil
}

// RemovePod unregisters a container (CNI DEL). An unknown container is not
// an error.
func (c *Client) RemovePod(ctx context.Context, containerID string) error {
	return c.do(ctx, http.MethodDelete, "/v1/pods/"+url.PathEscape(containerID), nil, nil)
}

// Health returns nil when the agent answers and is ready to register pods
// (CNI STATUS).
func (c *Client) Health(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/v1/health", nil, nil)
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	// The host is a placeholder: the transport always dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://meshsplice"+path, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		// Drop url.Error's `Post "http://meshsplice/..."` prefix: the URL
		// is made up.
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("%w at %s: %w", ErrAgentUnreachable, c.socket, err)
		}
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
			return fmt.Errorf("meshsplice agent at %s did not answer %s %s in time: %w", c.socket, method, path, err)
		}
		return fmt.Errorf("meshsplice agent at %s: %s %s: %w", c.socket, method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		apiErr := &Error{StatusCode: resp.StatusCode}
		if err := json.Unmarshal(b, apiErr); err != nil || apiErr.Code == "" {
			apiErr.Code = CodeInternal
			apiErr.Message = fmt.Sprintf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, bytes.TrimSpace(b))
		}
		return apiErr
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode answer to %s %s: %w", method, path, err)
	}
	return nil
}

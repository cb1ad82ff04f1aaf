package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
)

// maxBodyBytes bounds a request body. Annotations make registrations the
// largest requests; Kubernetes caps a pod's annotations at 256 KiB.
const maxBodyBytes = 1 << 20

// NewHandler returns the API's http.Handler, serving reg. log receives one
// line per registration change and per failed request; nil discards.
func NewHandler(reg Registry, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &handler{reg: reg, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/pods", h.pods)
	mux.HandleFunc("/v1/pods/{containerID}", h.pod)
	mux.HandleFunc("/v1/health", h.health)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, r, http.StatusNotFound, CodeNotFound, fmt.Sprintf("no endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

type handler struct {
	reg Registry
	log *slog.Logger
}

func (h *handler) pods(w http.ResponseWriter, r *http.Request) {
	if !h.allow(w, r, http.MethodPost) {
		return
	}
	var req PodRegistration
	if err := decodeBody(w, r, &req); err != nil {
		h.fail(w, r, http.StatusBadRequest, CodeInvalidRequest, fmt.Sprintf("%v: %v", ErrInvalidRequest, err))
		return
	}
	if err := req.Validate(); err != nil {
		h.error(w, r, err)
		return
	}
	st, err := h.reg.AddPod(r.Context(), req)
	if err != nil {
		h.error(w, r, fmt.Errorf("register %s: %w", req, err))
		return
	}
	h.log.Info("pod registered", "containerID", req.ContainerID, "pod", req.String(),
		"netns", req.Netns, "ips", req.IPs, "capture", st.Capture, "splice", st.Splice)
	writeJSON(w, http.StatusOK, st)
}

func (h *handler) pod(w http.ResponseWriter, r *http.Request) {
	if !h.allow(w, r, http.MethodGet, http.MethodDelete) {
		return
	}
	id := r.PathValue("containerID")
	if err := ValidateContainerID(id); err != nil {
		h.error(w, r, fmt.Errorf("%w: %w", ErrInvalidRequest, err))
		return
	}
	if r.Method == http.MethodGet {
		st, err := h.reg.CheckPod(r.Context(), id)
		if err != nil {
			h.error(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
		return
	}
	if err := h.reg.RemovePod(r.Context(), id); err != nil {
		h.error(w, r, fmt.Errorf("unregister container %s: %w", id, err))
		return
	}
	h.log.Info("pod unregistered", "containerID", id)
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) health(w http.ResponseWriter, r *http.Request) {
	if !h.allow(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	if hc, ok := h.reg.(HealthChecker); ok {
		if err := hc.Health(r.Context()); err != nil {
			h.error(w, r, err)
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// allow answers 405 unless the request uses one of methods.
func (h *handler) allow(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	for _, m := range methods {
		if r.Method == m {
			return true
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	h.fail(w, r, http.StatusMethodNotAllowed, CodeMethodNotAllowed,
		fmt.Sprintf("%s %s: method not allowed (allowed: %s)", r.Method, r.URL.Path, strings.Join(methods, ", ")))
	return false
}

// error answers with the status and code of err's sentinel.
func (h *handler) error(w http.ResponseWriter, r *http.Request, err error) {
	status, code := http.StatusInternalServerError, CodeInternal
	switch {
	case errors.Is(err, ErrInvalidRequest):
		status, code = http.StatusBadRequest, CodeInvalidRequest
	case errors.Is(err, ErrPodNotFound):
		status, code = http.StatusNotFound, CodePodNotFound
	case errors.Is(err, ErrConflict):
		status, code = http.StatusConflict, CodeConflict
	case errors.Is(err, ErrNotReady):
		status, code = http.StatusServiceUnavailable, CodeNotReady
	}
	h.fail(w, r, status, code, err.Error())
}

func (h *handler) fail(w http.ResponseWriter, r *http.Request, status int, code, msg string) {
	level := slog.LevelWarn
	if status >= 500 && status != http.StatusServiceUnavailable {
		level = slog.LevelError
	}
	h.log.Log(r.Context(), level, "request failed", "method", r.Method, "path", r.URL.Path,
		"status", status, "code", code, "error", msg)
	writeJSON(w, status, Error{Code: code, Message: msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decodeBody decodes a JSON request body into v, with errors that name the
// offending field.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return fmt.Errorf("body larger than %d bytes", tooBig.Limit)
		}
		return fmt.Errorf("read body: %w", err)
	}
	if len(strings.TrimSpace(string(body))) == 0 {
		return errors.New("empty body: a JSON object is required")
	}
	if err := json.Unmarshal(body, v); err != nil {
		var typeErr *json.UnmarshalTypeError
		var syntaxErr *json.SyntaxError
		switch {
		case errors.As(err, &typeErr) && typeErr.Field != "":
			return fmt.Errorf("%s: JSON %s where %s is expected", typeErr.Field, typeErr.Value, jsonKind(typeErr.Type.Kind().String()))
		case errors.As(err, &typeErr):
			return fmt.Errorf("body must be a JSON object, not %s", typeErr.Value)
		case errors.As(err, &syntaxErr):
			return fmt.Errorf("body is not valid JSON (offset %d): %w", syntaxErr.Offset, err)
		}
		return err
	}
	return nil
}

// jsonKind names a Go kind as the JSON type a client should send.
func jsonKind(kind string) string {
	switch kind {
	case "string":
		return "a string"
	case "map", "struct":
		return "an object"
	case "slice", "array":
		return "an array"
	case "bool":
		return "a boolean"
	}
	return "a " + kind
}

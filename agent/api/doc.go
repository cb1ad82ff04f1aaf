// Package api is the local registration API between the meshsplice CNI
// plugin (cmd/meshsplice-cni) and the node agent: HTTP/1.1 with JSON bodies
// over a unix socket, by default [DefaultSocket] (/run/meshsplice/cni.sock).
// The agent serves it with [NewHandler] (or [Listen]) on top of a
// [Registry], the agent's own pod bookkeeping; the plugin calls it with a
// [Client]. Package apitest has an in-memory Registry for tests. The package
// depends on the standard library only: the CNI plugin links it, and it
// runs once per pod.
//
// Only root (or one uid given to [AllowUID]) may use the socket made by
// [Listen]: it has mode 0600 from the moment it appears at its path, and
// every request is checked against the caller's SO_PEERCRED. Request size
// and read time are bounded ([DefaultLimits]); see access.go.
//
// Being plain HTTP, it can be poked at with curl:
//
//	curl --unix-socket /run/meshsplice/cni.sock http://meshsplice/v1/health
//	curl --unix-socket /run/meshsplice/cni.sock http://meshsplice/v1/pods/CONTAINER_ID
//
// # Endpoints
//
//	POST   /v1/pods                register a pod (CNI ADD); body: PodRegistration
//	                               200 PodStatus
//	GET    /v1/pods/{containerID}  look a pod up (CNI CHECK)
//	                               200 PodStatus, 404 pod_not_found
//	DELETE /v1/pods/{containerID}  unregister a pod (CNI DEL); idempotent
//	                               204, also when the pod is unknown
//	GET    /v1/health              is the agent ready to register pods (CNI STATUS)
//	                               200 {"status":"ok"}, 503 not_ready
//
// A registration ([PodRegistration]):
//
//	{
//	  "containerID": "0b1c...",            required; [a-zA-Z0-9][a-zA-Z0-9_.-]*
//	  "netns": "/var/run/netns/cni-1234",  required; absolute path
//	  "ifName": "eth0",                    required
//	  "ips": ["10.22.0.5", "fd00:22::5"],  required, at least one
//	  "podName": "web-0",                  optional (K8S_POD_NAME)
//	  "podNamespace": "shop",              optional (K8S_POD_NAMESPACE)
//	  "podUID": "6f1e...",                 optional (K8S_POD_UID)
//	  "serviceAccount": "web",             optional (K8S_POD_SERVICE_ACCOUNT)
//	  "annotations": {"sidecar.istio.io/status": "{}"},  optional
//	  "network": "meshsplice"              optional: the CNI network name
//	}
//
// The agent's view of a pod ([PodStatus]):
//
//	{
//	  "pod": { ...the registration... },
//	  "capture": true,     the agent captures the pod's traffic
//	  "splice": true,      and splices its connections
//	  "warnings": ["..."]  what the agent found odd in the pod's settings
//	}
//
// Re-registering a container ID replaces the previous registration (a
// runtime may retry an ADD). Unknown fields are ignored, so that a newer
// plugin can talk to an older agent and the other way round.
//
// # Errors
//
// Every error answer has the body {"error": "message", "code": "code"}. The
// message says what was wrong; for a bad request it names the field, for
// example "invalid request: ips[1]: \"10.0.0.300\" is not an IP address".
//
//	400 invalid_request  the body or a field is invalid ([ErrInvalidRequest])
//	403 forbidden        the caller is neither root nor the allowed uid ([ErrForbidden])
//	404 pod_not_found    no such container ID ([ErrPodNotFound])
//	404 not_found        no such endpoint
//	405 method_not_allowed
//	409 conflict         the registration contradicts the agent's state ([ErrConflict])
//	503 not_ready        the agent cannot register pods yet ([ErrNotReady])
//	500 internal         anything else
//
// A Registry reports these conditions by returning (or wrapping) the
// sentinel errors; the [Client] turns answers back into an [*Error] that
// matches the same sentinels with errors.Is. When the client cannot connect
// at all, its error wraps [ErrAgentUnreachable].
package api

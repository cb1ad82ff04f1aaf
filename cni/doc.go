// Package cni is the meshsplice CNI plugin (cmd/meshsplice-cni is its
// main): a chained plugin that, after the plugins that give a pod its
// interface and addresses, registers the pod with the meshsplice node agent
// over the agent's unix socket (package agent/api). It supports the CNI
// spec versions 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0 ([SupportedVersions]),
// and writes nothing to stdout but its result (or error).
//
// # Commands
//
//   - ADD needs a prevResult ("meshsplice-cni must be chained after an
//     interface plugin (no prevResult)" otherwise). It takes the pod's
//     addresses from it -- those on interfaces whose sandbox is CNI_NETNS,
//     or all of them when no interface says so -- registers the pod, and
//     returns the prevResult unchanged (in the config's cniVersion).
//   - CHECK (0.4.0 on) asks the agent for the pod and fails unless it is
//     registered with the same namespace and addresses.
//   - DEL unregisters the pod. It is idempotent, never enters the
//     namespace (so it succeeds when the namespace is gone), and succeeds
//     when the agent does not know the pod or is down: a pod's teardown
//     never waits for meshsplice. The agent undoes its set-up of the
//     namespace: ::6/128 leaves the pod's lo if registering the pod added
//     it (an address that was there before stays).
//   - STATUS (1.1.0) fails with code 50 (plugin not available) when the
//     agent does not answer its health probe or says it is not ready.
//   - GC is not implemented (skel answers success): the plugin keeps no
//     state, and the agent drops pods whose namespace has gone.
//
// # Network config
//
//	{
//	  "type": "meshsplice-cni",
//	  "agentSocket": "/run/meshsplice/cni.sock",  // default
//	  "agentUnreachable": "fail",                 // or "pass"; default "fail"
//	  "timeout": "10s",                           // each call to the agent; default 10s
//	  "logFile": "/var/log/meshsplice/cni.log",   // optional; default: warnings to stderr
//	  "annotations": {"meshsplice.io/splice": "disabled"},  // optional defaults
//	  "capabilities": {"io.kubernetes.cri.pod-annotations": true}
//	}
//
// An invalid field fails every command with code 7 (invalid network
// config) and a message naming the field.
//
// # When the agent is down
//
// "Down" means nothing accepts connections on agentSocket, or the agent
// answers that it is not ready. With agentUnreachable "fail", ADD and CHECK
// fail with code 11 (try again later) and a message that says so and how
// to let pods start anyway; STATUS fails with code 50. With "pass", ADD
// succeeds without registering the pod, which then runs unmeshed (nothing
// captures its traffic), CHECK accepts a pod the agent does not know,
// STATUS succeeds, and the plugin logs why. Either way an agent that
// answers with an error (a pod whose annotations are invalid, say) fails
// ADD, and an agent that does not answer within the timeout fails ADD with
// code 11.
//
// # The pod's identity and settings
//
// Name, namespace and UID come from CNI_ARGS K8S_POD_NAME,
// K8S_POD_NAMESPACE and K8S_POD_UID, as Kubernetes runtimes pass them; the
// service account from K8S_POD_SERVICE_ACCOUNT (meshsplice's own key:
// standalone callers set it, Kubernetes runtimes do not). Unknown CNI_ARGS
// keys are ignored.
//
// The pod's annotations -- the Istio settings and meshsplice.io switches --
// come through the runtimeConfig capability
// "io.kubernetes.cri.pod-annotations" ([PodAnnotationsCapability]), which
// the network config must declare in "capabilities". That is the key under
// which containerd and CRI-O pass a Kubernetes pod's annotations, so
// Kubernetes needs nothing more; standalone, a libcni caller passes the
// map in RuntimeConf.CapabilityArgs, and cnitool reads it from the CAP_ARGS
// environment variable:
//
//	CAP_ARGS='{"io.kubernetes.cri.pod-annotations": {"sidecar.istio.io/status": "{}"}}'
//
// A standalone caller passes the pod's labels, which AuthorizationPolicy
// selectors match, the same way under "io.meshsplice.pod-labels"
// ([PodLabelsCapability]; declare it in "capabilities" too).
//
// On Kubernetes (`meshsplice agent --kubernetes`) the plugin needs nothing
// but CNI_ARGS: the agent looks the pod up on the API server by
// K8S_POD_NAMESPACE and K8S_POD_NAME (its informer's cache, else a GET
// bounded by --pod-lookup-timeout) and registers it with the object's
// annotations, labels, service account and UID, whatever the runtime
// passed; a K8S_POD_UID that is not the object's is refused. An API server
// out of reach fails ADD as "agent not ready", so agentUnreachable decides
// as when the agent is down.
//
// The config's "annotations" are defaults under the pod's own, key by key.
// JSON in the capability keeps annotation values intact (they may contain
// ";" and "=", which CNI_ARGS cannot carry).
package cni

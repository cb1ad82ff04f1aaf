// Package bench is `meshsplice bench`: it measures what a request costs on
// the paths an Istio sidecar creates, without sidecars, with Istio's own
// iptables capture, and with meshsplice's capture and splice, side by side
// in one run on one kernel.
//
// A run builds each topology (network-namespace pods on bridged "nodes",
// one meshsplice datapath per node attached to that node's cgroup, test
// sidecars following Envoy's interception contract, echo, sink and fortio
// servers), then measures every cell of the matrix (topology x workload)
// in every mode, modes interleaved inside each repetition with the starting
// mode rotated, every process pinned, warm-up discarded. Each run checks
// that its mode really took the path it claims (kernel counters and the
// pod's iptables rules), so a mis-set mode fails the benchmark instead of
// producing a number. CPU time per request is the pods' role cgroups'
// cpu.stat over the measurement window, read on the pods' CPU by the side
// that defines the window (mstest client --cpu-stat; mstest window around
// fortio), never by the benchmark when it gets to the window's marks, which
// a loaded machine can delay past the window's end; a window whose readings
// missed its edges is "unknown" (null), never 0.
//
// Modes:
//
//	direct           no sidecar in the path: capture off, no rules; the
//	                 client app talks to the server app (sidecars idle)
//	iptables         Istio's sidecar rules (package baseline, written by
//	                 istio-iptables) in every meshed pod; meshsplice's
//	                 capture and splice switched off on the node, so the
//	                 sidecars learn SO_ORIGINAL_DST from conntrack
//	capture          meshsplice capture (connect4/6, sk_lookup,
//	                 getsockopt), splice off
//	meshsplice       capture + splice as installed by default: sidecar <->
//	                 sidecar spliced, app sockets untouched
//	meshsplice-full  capture + splice with meshsplice.io/app-splice: "true":
//	                 app <-> sidecar spliced too
//
// Topologies:
//
//	in-pod     client app -> its own sidecar -> a server in an unmeshed pod
//	same-node  client pod -> server pod through both sidecars, one bridge
//	two-nodes  client and server pods on two nodes (namespaces joined by a
//	           routed veth), one datapath per node: only in-pod hops can be
//	           spliced
//
// Limits (bench --limits) measures a new connection on the same-node path
// with the topology's 2 pods and with 1000 registered, interleaved, and the
// BPF maps' memory; Soak (bench --soak) runs new and long-lived connections
// while pods and the kernel policy churn and checks that memory and map
// entries come back. docs/limits.md has the method and the figures.
//
// Everything it creates is named msbench-<random>-... (namespaces, cgroups
// under the cgroup v2 mount, pins under /sys/fs/bpf) and removed at the end
// of each topology, also on error and Ctrl-C.
package bench

// Package baseline loads Istio's own sidecar iptables rules into a pod's
// network namespace: the REDIRECT capture that meshsplice's eBPF datapath
// replaces, used as the baseline of the benchmark and the demo.
//
// The rules are not written by hand. They are the exact iptables-restore and
// ip6tables-restore input that Istio's istio-iptables tool (what the
// istio-init container runs) generates for a sidecar with the injection
// template's defaults:
//
//	istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020
//
// built from istio.io/istio at IstioVersion (the version pinned in
// tools/istio/go.mod) and captured with --dry-run, once for an IPv4 pod and
// once with --dual-stack (ISTIO_DUAL_STACK=true) for the IPv6 rules. They
// live in testdata/istio-sidecar-v4.golden and
// testdata/istio-sidecar-v6.golden, embedded in the package, each headed by a
// comment line naming the Istio version and the command line. Rules returns
// them.
//
// To regenerate them, for instance after raising the istio.io/istio version
// in tools/istio/go.mod, run
//
//	hack/istio-iptables-golden.sh
//
// and update IstioVersion. The script builds istio-iptables into
// .cache/bin/istio-iptables-VERSION (a minute or so the first time) and runs
// it in throwaway network namespaces with known addresses, since
// istio-iptables decides whether to emit IPv6 rules from the addresses it
// sees. The test suite does not rebuild Istio, being too slow for it; instead
//
//	hack/istio-iptables-golden.sh --check
//
// rebuilds the tool, regenerates the files into a scratch directory and fails
// if they differ from the committed ones. The package's unit tests only check
// that the embedded files are well formed and name IstioVersion and the
// version in tools/istio/go.mod.
//
// Apply loads the rules the way istio-iptables does (iptables-restore
// --noflush) with the nf_tables backend (iptables-nft-restore,
// ip6tables-nft-restore), run through "nsenter --net=PATH", never "ip netns
// exec", which remounts /sys. (istio-iptables picks nft too, unless the
// namespace already holds iptables-legacy rules.) The rules themselves need
// no pod address; istio-iptables does, to decide whether IPv6 is enabled.
// With IPv6, Apply also adds ::6/128 to the loopback interface, as
// istio-iptables does outside --dry-run when IPv6 is enabled, so it is not in
// the golden files: ::6 is the source address of Envoy's inbound passthrough
// connections, and only the rule "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN"
// keeps them from being redirected back to the sidecar. Without the address
// the sidecar must dial from the pod address and loops through its own
// inbound listener. Apply's cleanup removes exactly what Apply added; it does
// not use istio-iptables --cleanup-only, which was seen to miss nft rules once
// legacy tables existed.
//
// Present tells whether a namespace holds all of the rules' chains, some of
// them, or none (meshsplice handover leaves a pod with all of them alone and
// refuses one with some).
//
// The rules redirect all TCP traffic of the pod: outbound connections of
// every process but uid/gid 1337 (except to loopback addresses) to port
// 15001, inbound connections (except to ports 15008, 15090, 15021 and 15020)
// to port 15006.
package baseline

// Package testnet provides helpers for privileged, real-kernel tests of
// meshsplice: network namespaces, cgroup v2 directories, bridge/veth pod
// topologies spanning one or more "nodes", and processes started inside a
// network namespace and a cgroup from their first instruction. It is the
// testing.TB layer over package internal/lab, which implements all of
// these for the benchmark, the demo and the tests alike: testnet names
// things mstest-*, registers their removal with tb.Cleanup and fails the
// test when it cannot set them up.
//
// Every helper takes a testing.TB, calls tb.Helper and registers its own
// teardown with tb.Cleanup, so resources are removed also when a test fails.
// Helpers fail the test (tb.Fatalf) when they cannot set things up.
//
// All resources are named "mstest-..." (network namespaces under /run/netns,
// cgroup directories directly under the cgroup2 mount). Leftovers reports the
// ones this process created and that still exist, and ListLeftovers lists
// every mstest-* resource on the machine, whoever created it.
//
// The tests using this package must run as root; RequireRoot skips a test
// otherwise. The host's root network namespace is never modified apart from
// creating and deleting named namespaces (and, like "ip netns add", making
// /run/netns a shared mount point the first time).
package testnet

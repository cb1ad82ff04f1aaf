package datapath

import (
	"fmt"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/redirect"
)

// Counter identifies one kernel counter (enum ms_counter in bpf/common.h).
type Counter = redirect.CaptureMsCounter

// Counters are the kernel counters summed over CPUs, by name (see
// CounterNames). They only grow, until the datapath is detached.
type Counters map[string]uint64

// counterInfo names each counter and the program that counts it.
var counterInfo = map[Counter]struct{ program, name string }{
	redirect.CaptureMsCounterMS_C_CONNECT_MESHED:             {"connect", "meshed"},
	redirect.CaptureMsCounterMS_C_CONNECT_CAPTURED:           {"connect", "captured"},
	redirect.CaptureMsCounterMS_C_SKIP_CAPTURE_OFF:           {"connect", "skip_capture_off"},
	redirect.CaptureMsCounterMS_C_SKIP_PROXY:                 {"connect", "skip_proxy"},
	redirect.CaptureMsCounterMS_C_SKIP_LOOPBACK:              {"connect", "skip_loopback"},
	redirect.CaptureMsCounterMS_C_SKIP_EXCLUDED_PORT:         {"connect", "skip_excluded_port"},
	redirect.CaptureMsCounterMS_C_SKIP_EXCLUDED_RANGE:        {"connect", "skip_excluded_range"},
	redirect.CaptureMsCounterMS_C_SKIP_NOT_INCLUDED:          {"connect", "skip_not_included"},
	redirect.CaptureMsCounterMS_C_SKIP_IPV6:                  {"connect", "skip_ipv6"},
	redirect.CaptureMsCounterMS_C_CONNECT_HAIRPIN:            {"connect", "captured_hairpin"},
	redirect.CaptureMsCounterMS_C_CONNECT_NO_STORAGE:         {"connect", "no_storage"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_OUTBOUND:          {"getsockopt", "orig_dst_outbound"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_INBOUND:           {"getsockopt", "orig_dst_inbound"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_KERNEL:            {"getsockopt", "orig_dst_kernel"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_SHORT_BUF:         {"getsockopt", "short_buffer"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_MISSING:           {"getsockopt", "orig_dst_missing"},
	redirect.CaptureMsCounterMS_C_INBOUND_MESHED:             {"sk_lookup", "meshed"},
	redirect.CaptureMsCounterMS_C_INBOUND_CAPTURED:           {"sk_lookup", "captured"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_OFF:           {"sk_lookup", "skip_capture_off"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_PROXY_PORT:    {"sk_lookup", "skip_proxy_port"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_PASSTHROUGH:   {"sk_lookup", "skip_passthrough_source"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_LOOPBACK:      {"sk_lookup", "skip_loopback_source"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_SELF:          {"sk_lookup", "skip_self"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_IPV6:          {"sk_lookup", "skip_ipv6"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_EXCLUDED_PORT: {"sk_lookup", "skip_excluded_port"},
	redirect.CaptureMsCounterMS_C_INBOUND_SKIP_NOT_INCLUDED:  {"sk_lookup", "skip_not_included"},
	redirect.CaptureMsCounterMS_C_INBOUND_NO_LISTENER:        {"sk_lookup", "refused_no_listener"},
	redirect.CaptureMsCounterMS_C_INBOUND_ASSIGN_FAILED:      {"sk_lookup", "refused_assign_failed"},
	redirect.CaptureMsCounterMS_C_LISTENER_STARTED:           {"sockops", "listener_started"},
	redirect.CaptureMsCounterMS_C_LISTENER_REGISTERED:        {"listener_iter", "listener_registered"},
	redirect.CaptureMsCounterMS_C_LISTENER_REFUSED:           {"listener_iter", "listener_refused"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_STORED:            {"sockops", "orig_dst_stored"},
	redirect.CaptureMsCounterMS_C_ORIG_DST_EVICTED:           {"sockops", "orig_dst_evicted"},
	redirect.CaptureMsCounterMS_C_SOCK_INSERTED:              {"sockops", "sock_inserted"},
	redirect.CaptureMsCounterMS_C_SOCK_INSERT_FAILED:         {"sockops", "sock_insert_failed"},
	redirect.CaptureMsCounterMS_C_SOCK_SKIP_SPLICE_OFF:       {"sockops", "skip_splice_off"},
	redirect.CaptureMsCounterMS_C_SOCK_SKIP_PEER_UNKNOWN:     {"sockops", "skip_peer_unknown"},
	redirect.CaptureMsCounterMS_C_SOCK_SKIP_ROLE_UNKNOWN:     {"sockops", "skip_role_unknown"},
	redirect.CaptureMsCounterMS_C_SOCK_SKIP_APP:              {"sockops", "skip_app_socket"},
	redirect.CaptureMsCounterMS_C_SOCK_SKIP_EARLY_DATA:       {"sockops", "skip_early_data"},
	redirect.CaptureMsCounterMS_C_POLICY_EGRESS_ALLOWED:      {"policy", "egress_allowed"},
	redirect.CaptureMsCounterMS_C_POLICY_EGRESS_DENIED:       {"policy", "egress_denied"},
	redirect.CaptureMsCounterMS_C_POLICY_INGRESS_ALLOWED:     {"policy", "ingress_allowed"},
	redirect.CaptureMsCounterMS_C_POLICY_INGRESS_DENIED:      {"policy", "ingress_denied"},
	redirect.CaptureMsCounterMS_C_POLICY_DENIAL_NOT_RECORDED: {"policy", "denial_not_recorded"},
	redirect.CaptureMsCounterMS_C_POLICY_TORN_DOWN:           {"policy", "torn_down"},
	redirect.CaptureMsCounterMS_C_POLICY_TEARDOWN_FAILED:     {"policy", "teardown_failed"},
	redirect.CaptureMsCounterMS_C_MSG_REDIRECTED:             {"sk_msg", "redirected"},
	redirect.CaptureMsCounterMS_C_BYTES_REDIRECTED:           {"sk_msg", "bytes_redirected"},
	redirect.CaptureMsCounterMS_C_MSG_MISS_FIRST:             {"sk_msg", "miss_first_send"},
	redirect.CaptureMsCounterMS_C_MSG_MISS_LATER:             {"sk_msg", "miss_later_send"},
	redirect.CaptureMsCounterMS_C_MSG_AFTER_MISS:             {"sk_msg", "tcp_after_fallback"},
	redirect.CaptureMsCounterMS_C_BYTES_AFTER_MISS:           {"sk_msg", "bytes_tcp_after_fallback"},
	redirect.CaptureMsCounterMS_C_MSG_DRAIN:                  {"sk_msg", "drain_fallbacks"},
	redirect.CaptureMsCounterMS_C_MSG_PASS:                   {"sk_msg", "tcp_by_design"},
	redirect.CaptureMsCounterMS_C_BYTES_PASS:                 {"sk_msg", "bytes_tcp_by_design"},
	redirect.CaptureMsCounterMS_C_LISTENER_EVENT_LOST:        {"sockops", "listener_event_lost"},
	redirect.CaptureMsCounterMS_C_LISTENER_RESYNCED:          {"agent", "listener_resynced"},
	redirect.CaptureMsCounterMS_C_SPLICE_REFUSED:             {"readers", "splice_refused"},
	redirect.CaptureMsCounterMS_C_SPLICE_UNGUARDED:           {"readers", "splice_unguarded"},
	redirect.CaptureMsCounterMS_C_SPLICE_READER_RESET:        {"readers", "splice_reader_reset"},
	redirect.CaptureMsCounterMS_C_SOCK_SKIP_SPLICE_READER:    {"sockops", "skip_splice_reader_pod"},
	redirect.CaptureMsCounterMS_C_MSG_BACKPRESSURE:           {"sk_msg", "backpressure_fallbacks"},
	redirect.CaptureMsCounterMS_C_MSG_RESUMED:                {"sk_msg", "backpressure_resumed"},
	redirect.CaptureMsCounterMS_C_SOCK_NAT_PAIRED:            {"sockops", "nat_paired"},
	redirect.CaptureMsCounterMS_C_SOCK_NAT_MATCHED:           {"sockops", "nat_matched"},
	redirect.CaptureMsCounterMS_C_SOCK_NAT_MISS:              {"sockops", "nat_miss"},
}

// CounterName is "program.name", e.g. "sk_msg.redirected".
func CounterName(c Counter) string {
	info, ok := counterInfo[c]
	if !ok {
		return fmt.Sprintf("unknown.%d", c)
	}
	return info.program + "." + info.name
}

// Counters reads every counter, summed over CPUs.
func (d *Datapath) Counters() (Counters, error) {
	return readCounters(d.capture.MsCounters)
}

// ReadPinnedCounters reads the counters of the datapath pinned at pinDir,
// without loading anything (for status on a node where the agent is gone).
func ReadPinnedCounters(pinDir string) (Counters, error) {
	m, err := ebpf.LoadPinnedMap(mapDir(pinDir)+"/ms_counters", &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotAttached, err)
	}
	defer m.Close()
	return readCounters(m)
}

func readCounters(m *ebpf.Map) (Counters, error) {
	out := Counters{}
	for c := Counter(0); c < redirect.CaptureMsCounterMS_C_MAX; c++ {
		var perCPU []uint64
		if err := m.Lookup(uint32(c), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", CounterName(c), err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		out[CounterName(c)] = sum
	}
	return out, nil
}

// Program returns the counters of one program ("sk_msg", "connect", ...),
// without the program prefix.
func (c Counters) Program(program string) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range c {
		if p, name, ok := strings.Cut(k, "."); ok && p == program {
			out[name] = v
		}
	}
	return out
}

// Sub returns c - before, counter by counter: what happened in between.
func (c Counters) Sub(before Counters) Counters {
	out := Counters{}
	for k, v := range c {
		out[k] = v - before[k]
	}
	return out
}

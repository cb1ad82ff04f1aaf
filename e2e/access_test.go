package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// TestRegistrationIsCheckedAgainstItsNetns (issue 14 items 8 and 9): a
// registration may name only a netns that is not the agent's (the host's),
// and only addresses that netns holds; an invalid one, also as a
// re-registration, is refused with an error naming the field, and the
// previous registration stays in force in the agent and the kernel.
func TestRegistrationIsCheckedAgainstItsNetns(t *testing.T) {
	m, ag, _ := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	p := m.addPod(node, "p", nil)
	other := m.addPod(node, "other", nil)
	good := api.PodRegistration{ContainerID: "c-p", Netns: p.NS.Path(), IfName: "eth0",
		IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: p.Name, PodNamespace: "default", Annotations: injected()}
	with := func(change func(r *api.PodRegistration)) api.PodRegistration {
		r := good
		r.IPs = append([]netip.Addr(nil), good.IPs...)
		r.Annotations = injected()
		change(&r)
		return r
	}
	bad := []struct {
		name, want string
		reg        api.PodRegistration
	}{
		{"host netns", "netns: /proc/", with(func(r *api.PodRegistration) { r.Netns = fmt.Sprintf("/proc/%d/ns/net", ag.proc.PID()) })},
		{"address of no interface", "ips[1]: 192.0.2.77 is not an address of netns", with(func(r *api.PodRegistration) {
			r.IPs = []netip.Addr{p.IPv4, netip.MustParseAddr("192.0.2.77")}
		})},
		{"another pod's address", "ips[2]: " + other.IPv4.String() + " is not an address", with(func(r *api.PodRegistration) {
			r.IPs = append(r.IPs, other.IPv4)
		})},
		{"inbound port out of range", istio.AnnotationIncludeInboundPorts, with(func(r *api.PodRegistration) {
			r.Annotations[istio.AnnotationIncludeInboundPorts] = "80,65536"
		})},
		{"bad CIDR", istio.AnnotationExcludeOutboundIPRanges, with(func(r *api.PodRegistration) {
			r.Annotations[istio.AnnotationExcludeOutboundIPRanges] = "10.0.0.0/33"
		})},
	}
	register := func(r api.PodRegistration) error {
		_, err := ag.client.AddPod(context.Background(), r)
		return err
	}
	check := func(t *testing.T, tc struct {
		name, want string
		reg        api.PodRegistration
	}) {
		t.Helper()
		err := register(tc.reg)
		if !errors.Is(err, api.ErrInvalidRequest) || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("got %v, want an invalid request naming %q", err, tc.want)
		}
	}
	t.Run("first registration", func(t *testing.T) {
		for _, tc := range bad {
			t.Run(tc.name, func(t *testing.T) {
				check(t, tc)
				if pods := agentPods(t, ag); len(pods) != 0 {
					t.Fatalf("the agent keeps a refused registration: %+v", pods)
				}
				if kernelHasPod(t, m.pin, p.Cookie) || ipOwner(t, m.pin, p.IPv4) != 0 {
					t.Fatal("a refused registration reached the kernel")
				}
			})
		}
	})
	if err := register(good); err != nil {
		t.Fatal(err)
	}
	before := agentPods(t, ag)
	t.Run("re-registration", func(t *testing.T) {
		for _, tc := range bad {
			t.Run(tc.name, func(t *testing.T) {
				check(t, tc)
				after := agentPods(t, ag)
				if len(after) != 1 || !reflect.DeepEqual(after[0].Pod, before[0].Pod) {
					t.Fatalf("the previous registration is not in force:\nbefore %+v\nafter  %+v", before, after)
				}
				for _, ip := range good.IPs {
					if got := ipOwner(t, m.pin, ip); got != p.Cookie {
						t.Fatalf("kernel: %s belongs to netns %d, want the pod's %d", ip, got, p.Cookie)
					}
				}
				if ipOwner(t, m.pin, other.IPv4) != 0 {
					t.Fatalf("kernel: %s was given to the pod", other.IPv4)
				}
			})
		}
	})
}

// TestInvalidConfigEditKeepsTheLastGood (issue 14 item 8): an edit of the
// config folder that is invalid anywhere is rejected as a whole, also its
// valid part, with a log line naming the file; the last good configuration
// stays in force until the folder is valid again.
func TestInvalidConfigEditKeepsTheLastGood(t *testing.T) {
	m, ag, dir := agentMesh(t)
	write := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	switches := func(splice string) string {
		return "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {splice: " + splice + "}\n"
	}
	write("meshsplice.yaml", switches("disabled"))
	eventually(t, "splice switched off", func() bool { return !ag.status(m.pin).Node.Splice })

	// One edit: the switch back on (valid) and a broken policy.
	write("bad.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: shop}\nspec: {action: MAYBE}\n")
	write("meshsplice.yaml", switches("enabled"))
	eventually(t, "the agent rejects the edit naming the file", func() bool {
		return strings.Contains(ag.proc.Tail(), "keeping the last good one") && strings.Contains(ag.proc.Tail(), "bad.yaml")
	})
	if ag.status(m.pin).Node.Splice {
		t.Fatal("half of an invalid edit was applied: splice is on")
	}
	if err := os.Remove(filepath.Join(dir, "bad.yaml")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the valid folder applied", func() bool { return ag.status(m.pin).Node.Splice })
}

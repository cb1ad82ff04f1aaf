module github.com/meshsplice/meshsplice

go 1.26.0

require (
	github.com/cilium/ebpf v0.22.0
	github.com/hashicorp/go-multierror v1.1.1
	github.com/vishvananda/netlink v1.3.1
	github.com/vishvananda/netns v0.0.5
	golang.org/x/sys v0.50.0
)

require (
	github.com/containernetworking/cni v1.3.1 // indirect
	github.com/hashicorp/errwrap v1.0.0 // indirect
)

tool github.com/cilium/ebpf/cmd/bpf2go

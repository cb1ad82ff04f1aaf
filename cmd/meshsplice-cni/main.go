// Command meshsplice-cni is meshsplice's chained CNI plugin: it registers
// each pod with the meshsplice node agent and passes the previous plugin's
// result on unchanged. See package github.com/meshsplice/meshsplice/cni.
package main

import "github.com/meshsplice/meshsplice/cni"

func main() { cni.Main() }

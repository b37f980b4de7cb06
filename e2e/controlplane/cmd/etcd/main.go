// Command etcd is the upstream etcd server, at the version k8s.io/kubernetes
// itself requires (see go.mod), so the apiserver talks to the etcd it was
// tested with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

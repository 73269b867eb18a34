// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3),
// unmodified: this is a copy of the upstream etcd main function, which
// lives in a module (go.etcd.io/etcd/v3) that cannot be required on its own.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

// Command coredns is upstream CoreDNS (github.com/coredns/coredns),
// unmodified, with only the plugins the test cluster's Corefile uses compiled
// in (upstream's main imports all of them through core/plugin; the cloud
// provider plugins would triple the build). Plugin order comes from CoreDNS's
// own directive list, not from these imports.
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver" // the DNS server type
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}

// Command toxiproxy is one Toxiproxy proxy (github.com/Shopify/toxiproxy,
// unmodified) with a latency toxic each way, set from flags: the far
// laptop of `cargo xtask bench exchange --rtt-ms` and `bench connect
// --rtt-ms` reaches the apiserver through it. Flags instead of Toxiproxy's
// HTTP API, so that nothing but the proxy listens and no client is needed.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:16443", "address to listen on")
	upstream := flag.String("upstream", "", "address to forward to")
	latencyMs := flag.Int("latency-ms", 10, "delay added in each direction, milliseconds")
	flag.Parse()
	if *upstream == "" {
		fmt.Fprintln(os.Stderr, "toxiproxy: -upstream is required")
		os.Exit(2)
	}

	logger := zerolog.New(os.Stderr).Level(zerolog.WarnLevel)
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), logger)
	proxy := toxiproxy.NewProxy(server, "apiserver", *listen, *upstream)
	for _, direction := range []string{"upstream", "downstream"} {
		toxic := fmt.Sprintf(`{"type":"latency","stream":%q,"attributes":{"latency":%d}}`, direction, *latencyMs)
		if _, err := proxy.Toxics.AddToxicJson(strings.NewReader(toxic)); err != nil {
			fmt.Fprintf(os.Stderr, "toxiproxy: adding the %s latency: %v\n", direction, err)
			os.Exit(1)
		}
	}
	if err := proxy.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "toxiproxy: listening on %s: %v\n", *listen, err)
		os.Exit(1)
	}
	fmt.Printf("toxiproxy: %s -> %s, %d ms each way\n", *listen, *upstream, *latencyMs)
	select {}
}

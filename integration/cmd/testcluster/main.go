// Command testcluster builds the pinned control plane (`testcluster build`) or runs a
// test cluster until interrupted (`testcluster up`), printing its kubeconfig.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/node-agent/node-agent/integration/cluster"
)

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "build" && os.Args[1] != "up") {
		fmt.Fprintln(os.Stderr, "usage: testcluster build|up")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "testcluster:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cmd string) error {
	if cmd == "build" {
		bins, err := cluster.EnsureBinaries(ctx, os.Stderr)
		if err != nil {
			return err
		}
		fmt.Printf("kube-apiserver %s\netcd %s\nvirt-api %s\nvirt-controller %s\n", bins.KubeAPIServer, bins.Etcd, bins.VirtAPI, bins.VirtController)
		return nil
	}
	c, err := cluster.Start(ctx, cluster.Options{})
	if err != nil {
		return err
	}
	defer c.Stop(false)
	fmt.Printf("export KUBECONFIG=%s\n# Ctrl-C stops the cluster.\n", c.Kubeconfig)
	<-ctx.Done()
	return nil
}

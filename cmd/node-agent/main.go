// Command node-agent takes a KubeVirt node out of service without losing a VM.
//
//	node-agent run              the DaemonSet's command: drain this node when asked
//	node-agent inhibit          the DaemonSet's second container: hold host shutdowns (logind lock)
//	node-agent drain NODE       taint and cordon a node, follow its VMs until it is empty
//	node-agent undrain NODE     untaint and uncordon it, cancel pending evacuations
//	node-agent status NODE      each VM on a node, its strategy and what happens to it
//	node-agent options          the flags drain, undrain and status share (kubectl's)
//
// Installed as kubectl-node_agent on PATH it is also `kubectl node-agent ...`.
//
// Run `node-agent <command> -h` for a command's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `node-agent takes a KubeVirt node out of service without losing a VM.

Usage:
  node-agent run [flags]             drain this node on the drain taint or a host shutdown (the DaemonSet's command)
  node-agent inhibit [flags]         hold host shutdowns with a logind lock until 'run' says the node is safe
                                     (the DaemonSet's second container: a crash of 'run' does not drop the lock)
  node-agent drain NODE [flags]      taint (and cordon) NODE, then follow its VMs live until it is empty
                                     (exit 0), or --timeout (exit 1, with what is left); --all-pods, --dry-run
  node-agent undrain NODE [flags]    remove the drain taint and the cordon, cancel pending evacuations
  node-agent status NODE [-o json]   each VM on NODE, its strategy and what is happening to it
  node-agent options                 the flags drain, undrain and status share: kubectl's connection
                                     flags (--kubeconfig, --context, --as, --request-timeout, ...)

Installed on PATH as kubectl-node_agent it also runs as 'kubectl node-agent ...'.
Run 'node-agent <command> -h' for the flags of a command. Bad usage exits with status 2.
`

func main() {
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithCancel(context.Background())
	stopping := make(chan struct{})
	go func() {
		<-signals
		close(stopping)
		<-signals // a second signal ends everything at once
		cancel()
	}()
	code := run(ctx, stopping, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	cancel()
	os.Exit(code)
}

// run is main without the process around it; it returns the exit status: 0 done,
// 1 failed, 2 bad usage. stopping is closed on the first SIGTERM or interrupt; ctx ends
// on the second.
func run(ctx context.Context, stopping <-chan struct{}, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	if args[0] != "run" && args[0] != "inhibit" {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go func() {
			select {
			case <-stopping:
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	switch args[0] {
	case "run":
		a, err := parseRunArgs(args[1:], getenv, stderr)
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "node-agent run: %v\n", err)
			return 2
		}
		if err := runAgent(ctx, stopping, a, stderr); err != nil {
			fmt.Fprintf(stderr, "node-agent run: %v\n", err)
			return 1
		}
		return 0
	case "inhibit":
		a, err := parseInhibitArgs(args[1:], getenv, stderr)
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "node-agent inhibit: %v\n", err)
			return 2
		}
		if err := runInhibit(ctx, stopping, a, stderr); err != nil {
			fmt.Fprintf(stderr, "node-agent inhibit: %v\n", err)
			return 1
		}
		return 0
	case "drain", "undrain", "status", "options":
		return ctlMain(ctx, args, stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "node-agent: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

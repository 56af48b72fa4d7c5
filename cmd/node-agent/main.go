// Command node-agent takes a KubeVirt node out of service without losing a VM.
//
//	node-agent run      the DaemonSet's command: drain this node when asked
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
  node-agent run [flags]     drain this node on the drain taint (the DaemonSet's command)

Run 'node-agent <command> -h' for the flags of a command.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run is main without the process around it; it returns the exit status: 0 done,
// 1 failed, 2 bad usage.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
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
		if err := runAgent(ctx, a, stderr); err != nil {
			fmt.Fprintf(stderr, "node-agent run: %v\n", err)
			return 1
		}
		return 0
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "node-agent: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

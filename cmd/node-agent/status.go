package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/node-agent/node-agent/agent"
)

// statusCmd is `node-agent status NODE [-o json]`: each VM on the node, its strategy
// and what is happening to it (or, when the node is not being drained, what a drain
// would do to it).
func statusCmd(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var output string
	a, node, err := parseCtl("status", args, stderr, func(fs *flag.FlagSet) {
		fs.StringVar(&output, "o", "text", "output: text or json")
	})
	if err == nil && output != "text" && output != "json" {
		err = fmt.Errorf("-o %q: want text or json", output)
	}
	if err != nil {
		return usageError(stderr, "status", err)
	}
	c, err := newCtl(a)
	if err != nil {
		fmt.Fprintf(stderr, "node-agent status: %v\n", err)
		return exitTimeout
	}
	cfg, cfgErr := c.config(ctx)
	if cfgErr != nil {
		fmt.Fprintf(stderr, "warning: %v (using taint key %s from %s)\n", cfgErr, cfg.DrainTaintKey, cfg.DrainTaintKeySource)
	}
	v, err := c.look(ctx, node, cfg, true)
	if err != nil {
		fmt.Fprintf(stderr, "node-agent status: %v\n", err)
		return exitTimeout
	}
	if output == "json" {
		if err := writeJSON(stdout, v); err != nil {
			fmt.Fprintf(stderr, "node-agent status: %v\n", err)
			return exitTimeout
		}
		return exitOK
	}
	state := "not draining"
	if v.Draining {
		state = "draining (taint " + v.TaintKey + ")"
	}
	if v.Cordoned {
		state += ", cordoned"
	}
	fmt.Fprintf(stdout, "node/%s: %s; %d VMs", node, state, len(v.VMs))
	if v.Agent != "" {
		fmt.Fprintf(stdout, "; node-agent: %s", v.Agent)
	}
	fmt.Fprintln(stdout)
	if !v.Draining {
		printPredictions(stdout, v)
		return exitOK
	}
	for _, vm := range v.VMs {
		fmt.Fprintln(stdout, vmLine(vm))
	}
	return exitOK
}

// undrainCmd is `node-agent undrain NODE`: remove the drain taint and the cordon, and
// cancel the evacuations still pending on the node.
func undrainCmd(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a, node, err := parseCtl("undrain", args, stderr, nil)
	if err != nil {
		return usageError(stderr, "undrain", err)
	}
	c, err := newCtl(a)
	if err != nil {
		fmt.Fprintf(stderr, "node-agent undrain: %v\n", err)
		return exitTimeout
	}
	cfg, cfgErr := c.config(ctx)
	if cfgErr != nil {
		fmt.Fprintf(stderr, "warning: %v (using taint key %s from %s)\n", cfgErr, cfg.DrainTaintKey, cfg.DrainTaintKeySource)
	}
	if err := c.setDrain(ctx, node, cfg.DrainTaintKey, false); err != nil {
		fmt.Fprintf(stderr, "node-agent undrain: %v\n", err)
		return exitTimeout
	}
	fmt.Fprintf(stdout, "node/%s: taint %s removed, uncordoned\n", node, cfg.DrainTaintKey)
	vmis, _, err := c.onNode(ctx, node)
	if err != nil {
		fmt.Fprintf(stderr, "node-agent undrain: %v\n", err)
		return exitTimeout
	}
	failed := false
	for _, vmi := range vmis {
		if vmi.Status.EvacuationNodeName != node {
			continue
		}
		if err := agent.CancelEvacuation(ctx, c.subresources, vmi.Namespace, vmi.Name, node); err != nil {
			fmt.Fprintf(stderr, "node-agent undrain: %v\n", err)
			failed = true
			continue
		}
		fmt.Fprintf(stdout, "%s/%s: evacuation cancelled\n", vmi.Namespace, vmi.Name)
	}
	if failed {
		return exitTimeout
	}
	return exitOK
}

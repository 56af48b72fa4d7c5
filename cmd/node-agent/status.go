package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
	"k8s.io/kubectl/pkg/util/templates"
)

var (
	statusLong = templates.LongDesc(`
		Show each VM on a node, its effective eviction strategy and what is happening to
		it; when the node is not being drained, how each VM would end up after a drain.`)

	statusExample = templates.Examples(`
		# What is on node-7 and what a drain does (or would do) to it
		node-agent status node-7

		# The same as JSON
		node-agent status node-7 -o json`)

	undrainLong = templates.LongDesc(`
		Re-enable a node: remove the drain taint and the cordon, and cancel the
		evacuations still pending from it (KubeVirt v1.8+).`)

	undrainExample = templates.Examples(`
		# Put node-7 back into service
		node-agent undrain node-7`)
)

func newStatusCommand(o *ctlOptions) *cobra.Command {
	var output string
	c := &cobra.Command{
		Use:                   "status NODE [-o json]",
		DisableFlagsInUseLine: true,
		Short:                 "Show each VM on a node, its strategy and what is happening to it",
		Long:                  statusLong,
		Example:               statusExample,
		Args:                  oneNode,
		PreRunE: func(*cobra.Command, []string) error {
			if output != "text" && output != "json" {
				return usageError{fmt.Errorf("-o %q: want text or json", output)}
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error { return o.status(c.Context(), args[0], output) },
	}
	c.Flags().StringVarP(&output, "output", "o", "text", "Output format. One of: (text, json).")
	return c
}

// status shows each VM on the node, its strategy and what is happening to it (or,
// when the node is not being drained, what a drain would do to it).
func (o *ctlOptions) status(ctx context.Context, node, output string) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	cfg, err := o.config(ctx, c)
	if err != nil {
		return err
	}
	v, err := c.Look(ctx, node, cfg, true)
	if err != nil {
		return err
	}
	if output == "json" {
		return writeJSON(o.stdout, v)
	}
	state := "not draining"
	if v.Draining {
		state = "draining (taint " + v.TaintKey + ")"
	}
	if v.Cordoned {
		state += ", cordoned"
	}
	fmt.Fprintf(o.stdout, "node/%s: %s; %d VMs", node, state, len(v.VMs))
	if v.Agent != "" {
		fmt.Fprintf(o.stdout, "; node-agent: %s", v.Agent)
	}
	fmt.Fprintln(o.stdout)
	if !v.Draining {
		printPredictions(o.stdout, v)
		return nil
	}
	for _, vm := range v.VMs {
		fmt.Fprintln(o.stdout, vmLine(vm))
	}
	return nil
}

func newUndrainCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:                   "undrain NODE",
		DisableFlagsInUseLine: true,
		Short:                 "Remove the drain taint and the cordon, cancel pending evacuations",
		Long:                  undrainLong,
		Example:               undrainExample,
		Args:                  oneNode,
		RunE:                  func(c *cobra.Command, args []string) error { return o.undrain(c.Context(), args[0]) },
	}
}

// undrain removes the drain taint and the cordon, and cancels the evacuations still
// pending on the node.
func (o *ctlOptions) undrain(ctx context.Context, node string) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	cfg, err := o.config(ctx, c)
	if err != nil {
		return err
	}
	if err := c.RemoveDrain(ctx, node, cfg.DrainTaintKey); err != nil {
		return err
	}
	fmt.Fprintf(o.stdout, "node/%s: taint %s removed, uncordoned\n", node, cfg.DrainTaintKey)
	cancelled, err := c.CancelEvacuations(ctx, node)
	if err != nil {
		return err
	}
	failed := false
	for _, vmi := range cancelled {
		if vmi.Err != nil {
			fmt.Fprintf(o.stderr, "node-agent undrain: %v\n", vmi.Err)
			failed = true
			continue
		}
		fmt.Fprintf(o.stdout, "%s/%s: evacuation cancelled\n", vmi.Namespace, vmi.Name)
	}
	if failed {
		return exitError(exitFailed)
	}
	return nil
}

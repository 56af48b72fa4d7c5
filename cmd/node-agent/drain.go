package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"k8s.io/kubectl/pkg/util/templates"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/drainctl"
)

var (
	drainLong = templates.LongDesc(`
		Drain a KubeVirt node: taint it with the drain taint (NoSchedule) and cordon it,
		then follow its VMs live until none is left.

		The node-agent on the node moves each VM off the way its eviction strategy asks
		(live migration, or a graceful shutdown). The command exits 0 when the node is
		empty and safe to power off, 1 at --timeout naming what is left (the drain goes
		on; 'undrain' withdraws it).`)

	drainExample = templates.Examples(`
		# Drain node-7 and follow it until it is empty
		node-agent drain node-7

		# Show what a drain would do to each VM; change nothing
		node-agent drain node-7 --dry-run

		# Also evict the other pods, as kubectl drain --ignore-daemonsets --delete-emptydir-data --force
		node-agent drain node-7 --all-pods --timeout=1h`)
)

type drainOptions struct {
	*ctlOptions
	timeout time.Duration
	allPods bool
	dryRun  bool
}

func newDrainCommand(o *ctlOptions) *cobra.Command {
	d := &drainOptions{ctlOptions: o}
	c := &cobra.Command{
		Use:                   "drain NODE",
		DisableFlagsInUseLine: true,
		Short:                 "Taint and cordon a node, then follow its VMs until it is empty",
		Long:                  drainLong,
		Example:               drainExample,
		Args:                  oneNode,
		RunE:                  func(c *cobra.Command, args []string) error { return d.run(c.Context(), args[0]) },
	}
	fs := c.Flags()
	fs.DurationVar(&d.timeout, "timeout", 30*time.Minute, "The length of time to follow the node before giving up (exit status 1); the drain itself goes on.")
	fs.BoolVar(&d.allPods, "all-pods", false, "If true, also evict every other pod, as kubectl drain --ignore-daemonsets --delete-emptydir-data --force.")
	fs.BoolVar(&d.dryRun, "dry-run", false, "If true, only show what a drain would do to each VM; change nothing.")
	fs.Duration("interval", time.Second, "")
	_ = fs.MarkDeprecated("interval", "drain follows the node with watches; the flag has no effect")
	return c
}

func (d *drainOptions) run(ctx context.Context, node string) error {
	c, err := d.client()
	if err != nil {
		return err
	}
	cfg, err := d.config(ctx, c)
	if err != nil {
		return err
	}
	if d.dryRun {
		v, err := c.Look(ctx, node, cfg, true)
		if err != nil {
			return err
		}
		fmt.Fprintf(d.stdout, "Dry run: draining %s (taint %s:NoSchedule, cordon) would do this to its %d VMs:\n", node, cfg.DrainTaintKey, len(v.VMs))
		printPredictions(d.stdout, v)
		return nil
	}
	if err := c.SetDrain(ctx, node, cfg.DrainTaintKey); err != nil {
		return err
	}
	fmt.Fprintf(d.stdout, "node/%s tainted %s=%s:NoSchedule and cordoned\n", node, cfg.DrainTaintKey, drainctl.DrainTaintValue)

	followCtx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	var pods *drainctl.OtherPods
	if d.allPods {
		pods = c.EvictOtherPods(node, d.stderr)
	}
	r := newRenderer(d.stdout, node)
	stopTicking := r.tick(followCtx)
	last, err := c.Follow(followCtx, node, cfg, pods, r.show)
	stopTicking()
	switch {
	case err == nil:
		r.done(fmt.Sprintf("node/%s drained in %s: no VM left, safe to power off", node, r.elapsed().Round(time.Second)))
		return nil
	case errors.Is(ctx.Err(), context.Canceled):
		r.done("interrupted; the drain goes on (node-agent undrain " + node + " withdraws it)")
	default:
		left := fmt.Sprintf("unknown (cannot read the node: %v)", err)
		if last.Node != "" {
			left = summarize(last)
		}
		r.done(fmt.Sprintf("timed out after %s; the drain goes on. Left on node/%s: %s", d.timeout, node, left))
	}
	return exitError(exitFailed)
}

func summarize(v drainctl.NodeView) string {
	var parts []string
	for _, vm := range v.VMs {
		parts = append(parts, fmt.Sprintf("%s/%s (%s: %s)", vm.Namespace, vm.Name, vm.State, vm.Detail))
	}
	if v.PodsLeft > 0 {
		parts = append(parts, fmt.Sprintf("%d other pods", v.PodsLeft))
	}
	return strings.Join(parts, ", ")
}

func printPredictions(w io.Writer, v drainctl.NodeView) {
	fmt.Fprintf(w, "%-40s %-22s %s\n", "VM", "STRATEGY", "ENDS UP")
	keys := make([]string, 0, len(v.VMs))
	strategies := map[string]string{}
	for _, vm := range v.VMs {
		k := vm.Namespace + "/" + vm.Name
		keys = append(keys, k)
		strategies[k] = vm.Strategy
	}
	sort.Strings(keys)
	for _, k := range keys {
		end := v.Predicted[k]
		if end == "" {
			end = "a virt-launcher pod of a VM running elsewhere: leaves with its migration"
		}
		fmt.Fprintf(w, "%-40s %-22s %s\n", k, strategies[k], end)
	}
}

// renderer shows the drain's progress: redrawn in place with a progress bar on a
// terminal (and its clock ticking), one line per change otherwise.
type renderer struct {
	out   io.Writer
	node  string
	tty   bool
	start time.Time

	mu    sync.Mutex
	view  *drainctl.NodeView // the last view shown
	total int                // the most VMs seen on the node
	lines int                // lines drawn last time (terminal)
	last  map[string]string  // VM -> last line printed (plain)
}

func newRenderer(out io.Writer, node string) *renderer {
	tty := false
	if f, ok := out.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &renderer{out: out, node: node, tty: tty, start: time.Now(), last: map[string]string{}}
}

func (r *renderer) elapsed() time.Duration { return time.Since(r.start) }

// show draws a new view of the node.
func (r *renderer) show(v drainctl.NodeView) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.view = &v
	if r.total < len(v.VMs) {
		r.total = len(v.VMs)
	}
	r.draw()
}

// tick redraws the terminal every second, for the clock, until the returned stop.
func (r *renderer) tick(ctx context.Context) (stop func()) {
	if !r.tty {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				r.mu.Lock()
				if r.view != nil {
					r.draw()
				}
				r.mu.Unlock()
			}
		}
	}()
	return func() { cancel(); <-done }
}

func vmLine(vm agent.VMStatus) string {
	what := string(vm.State)
	if vm.Detail != "" {
		what += ": " + vm.Detail
	}
	return fmt.Sprintf("%-40s %-22s %s", vm.Namespace+"/"+vm.Name, vm.Strategy, what)
}

func (r *renderer) draw() {
	v := r.view
	if !r.tty {
		seen := map[string]bool{}
		for _, vm := range v.VMs {
			k := vm.Namespace + "/" + vm.Name
			seen[k] = true
			if line := vmLine(vm); r.last[k] != line {
				fmt.Fprintln(r.out, line)
				r.last[k] = line
			}
		}
		var gone []string
		for k := range r.last {
			if !seen[k] {
				gone = append(gone, k)
			}
		}
		sort.Strings(gone)
		for _, k := range gone {
			fmt.Fprintf(r.out, "%-40s left the node\n", k)
			delete(r.last, k)
		}
		return
	}
	var b strings.Builder
	if r.lines > 0 {
		fmt.Fprintf(&b, "\x1b[%dA\x1b[J", r.lines)
	}
	lines := 0
	for _, vm := range v.VMs {
		b.WriteString(vmLine(vm) + "\n")
		lines++
	}
	done := r.total - len(v.VMs)
	width := 30
	filled := 0
	if r.total > 0 {
		filled = done * width / r.total
	}
	fmt.Fprintf(&b, "[%s%s] %d/%d VMs left node/%s", strings.Repeat("#", filled), strings.Repeat("-", width-filled), done, r.total, v.Node)
	if v.PodsLeft > 0 {
		fmt.Fprintf(&b, ", %d other pods to go", v.PodsLeft)
	}
	fmt.Fprintf(&b, " (%s)\n", r.elapsed().Round(time.Second))
	lines++
	r.lines = lines
	fmt.Fprint(r.out, b.String())
}

func (r *renderer) done(msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintln(r.out, msg)
	r.lines = 0
}

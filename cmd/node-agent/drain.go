package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/term"
	"k8s.io/kubectl/pkg/drain"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// Exit statuses of the workstation commands.
const (
	exitOK      = 0
	exitTimeout = 1 // the node is not empty yet, or the command failed
	exitUsage   = 2
)

type drainArgs struct {
	Timeout  time.Duration
	AllPods  bool
	DryRun   bool
	Interval time.Duration
}

// drainCmd is `node-agent drain NODE`: taint and cordon the node, then follow its
// VMs (and with --all-pods, evict and follow its other pods) until it is empty.
func drainCmd(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var d drainArgs
	a, node, err := parseCtl("drain", args, stderr, func(fs *flag.FlagSet) {
		fs.DurationVar(&d.Timeout, "timeout", 30*time.Minute, "give up following after this long (the drain itself goes on); exit status 1")
		fs.BoolVar(&d.AllPods, "all-pods", false, "also evict every other pod, as kubectl drain --ignore-daemonsets --delete-emptydir-data --force")
		fs.BoolVar(&d.DryRun, "dry-run", false, "show what would happen to each VM; change nothing")
		fs.DurationVar(&d.Interval, "interval", time.Second, "how often the view is refreshed")
	})
	if err != nil {
		return usageError(stderr, "drain", err)
	}
	c, err := newCtl(a)
	if err != nil {
		fmt.Fprintf(stderr, "node-agent drain: %v\n", err)
		return exitTimeout
	}
	cfg, cfgErr := c.config(ctx)
	if cfgErr != nil {
		fmt.Fprintf(stderr, "warning: %v (using taint key %s from %s)\n", cfgErr, cfg.DrainTaintKey, cfg.DrainTaintKeySource)
	}
	if cfg.DrainTaintKey == "" {
		cfg.DrainTaintKey = nodeinfo.DefaultDrainTaintKey
	}
	if d.DryRun {
		v, err := c.look(ctx, node, cfg, true)
		if err != nil {
			fmt.Fprintf(stderr, "node-agent drain: %v\n", err)
			return exitTimeout
		}
		fmt.Fprintf(stdout, "Dry run: draining %s (taint %s:NoSchedule, cordon) would do this to its %d VMs:\n", node, cfg.DrainTaintKey, len(v.VMs))
		printPredictions(stdout, v)
		return exitOK
	}
	if err := c.setDrain(ctx, node, cfg.DrainTaintKey, true); err != nil {
		fmt.Fprintf(stderr, "node-agent drain: %v\n", err)
		return exitTimeout
	}
	fmt.Fprintf(stdout, "node/%s tainted %s=draining:NoSchedule and cordoned\n", node, cfg.DrainTaintKey)

	followCtx, cancel := context.WithTimeout(ctx, d.Timeout)
	defer cancel()
	var pods *podEvictor
	if d.AllPods {
		pods = startPodEviction(followCtx, c, node, stderr)
	}
	r := newRenderer(stdout)
	start := time.Now()
	total := -1
	for {
		v, err := c.look(followCtx, node, cfg, false)
		if err == nil {
			if pods != nil {
				v.PodsLeft = pods.left(followCtx)
			}
			if total < len(v.VMs) {
				total = len(v.VMs)
			}
			r.render(v, total, time.Since(start))
			if len(v.VMs) == 0 && v.PodsLeft == 0 {
				r.done(fmt.Sprintf("node/%s drained in %s: no VM left, safe to power off", node, time.Since(start).Round(time.Second)))
				return exitOK
			}
		}
		select {
		case <-followCtx.Done():
			if errors.Is(ctx.Err(), context.Canceled) {
				r.done("interrupted; the drain goes on (node-agent undrain " + node + " withdraws it)")
				return exitTimeout
			}
			left := "unknown (cannot read the node)"
			if err == nil {
				left = summarize(v)
			}
			r.done(fmt.Sprintf("timed out after %s; the drain goes on. Left on node/%s: %s", d.Timeout, node, left))
			return exitTimeout
		case <-time.After(d.Interval):
		}
	}
}

func summarize(v view) string {
	var parts []string
	for _, vm := range v.VMs {
		parts = append(parts, fmt.Sprintf("%s/%s (%s: %s)", vm.Namespace, vm.Name, vm.State, vm.Detail))
	}
	if v.PodsLeft > 0 {
		parts = append(parts, fmt.Sprintf("%d other pods", v.PodsLeft))
	}
	return strings.Join(parts, ", ")
}

func printPredictions(w io.Writer, v view) {
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

// podEvictor evicts the node's other pods in the background, as kubectl drain would.
type podEvictor struct {
	helper *drain.Helper
	node   string
}

func startPodEviction(ctx context.Context, c *ctl, node string, errOut io.Writer) *podEvictor {
	p := &podEvictor{node: node, helper: &drain.Helper{
		Ctx: ctx, Client: c.kube, Force: true, IgnoreAllDaemonSets: true, DeleteEmptyDirData: true,
		GracePeriodSeconds: -1, PodSelector: kubevirtv1.AppLabel + "!=virt-launcher",
		EvictErrorRetryDelay: 5 * time.Second, Out: io.Discard, ErrOut: errOut,
	}}
	go func() {
		list, errs := p.helper.GetPodsForDeletion(node)
		if len(errs) > 0 {
			fmt.Fprintf(errOut, "listing the other pods of node/%s: %v\n", node, errs)
			return
		}
		if err := p.helper.DeleteOrEvictPods(list.Pods()); err != nil && ctx.Err() == nil {
			fmt.Fprintf(errOut, "evicting the other pods of node/%s: %v\n", node, err)
		}
	}()
	return p
}

func (p *podEvictor) left(ctx context.Context) int {
	h := *p.helper
	h.Ctx = ctx
	list, errs := h.GetPodsForDeletion(p.node)
	if len(errs) > 0 {
		return -1
	}
	return len(list.Pods())
}

// renderer shows the drain's progress: redrawn in place with a progress bar on a
// terminal, one line per change otherwise.
type renderer struct {
	out   io.Writer
	tty   bool
	lines int               // lines drawn last time (terminal)
	last  map[string]string // VM -> last line printed (plain)
}

func newRenderer(out io.Writer) *renderer {
	tty := false
	if f, ok := out.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &renderer{out: out, tty: tty, last: map[string]string{}}
}

func vmLine(vm agent.VMStatus) string {
	what := string(vm.State)
	if vm.Detail != "" {
		what += ": " + vm.Detail
	}
	return fmt.Sprintf("%-40s %-22s %s", vm.Namespace+"/"+vm.Name, vm.Strategy, what)
}

func (r *renderer) render(v view, total int, elapsed time.Duration) {
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
	done := total - len(v.VMs)
	width := 30
	filled := 0
	if total > 0 {
		filled = done * width / total
	}
	fmt.Fprintf(&b, "[%s%s] %d/%d VMs left node/%s", strings.Repeat("#", filled), strings.Repeat("-", width-filled), done, total, v.Node)
	if v.PodsLeft > 0 {
		fmt.Fprintf(&b, ", %d other pods to go", v.PodsLeft)
	}
	fmt.Fprintf(&b, " (%s)\n", elapsed.Round(time.Second))
	lines++
	r.lines = lines
	fmt.Fprint(r.out, b.String())
}

func (r *renderer) done(msg string) {
	fmt.Fprintln(r.out, msg)
	r.lines = 0
}

func usageError(w io.Writer, cmd string, err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	fmt.Fprintf(w, "node-agent %s: %v\n", cmd, err)
	return exitUsage
}

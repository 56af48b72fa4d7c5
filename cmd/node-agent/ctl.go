package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericclioptions"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/drainctl"
	"github.com/node-agent/node-agent/nodeinfo"
)

// Exit statuses of the workstation commands.
const (
	exitOK     = 0
	exitFailed = 1 // the command failed, or the node is not empty yet (drain --timeout)
	exitUsage  = 2
)

// usageError is bad usage: a flag, an argument.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// exitError ends a command with a status after it said why.
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// ctlOptions are what every workstation command shares: kubectl's connection flags
// (--kubeconfig, --context, --cluster, --user, --server, --token, --as,
// --request-timeout, ...) and where the cluster keeps node-agent's configuration.
type ctlOptions struct {
	conn              *genericclioptions.ConfigFlags
	kubeVirtNamespace string
	drainTaintKey     string
	migrationStall    time.Duration
	stdout, stderr    io.Writer
}

// client connects to the cluster the connection flags name.
func (o *ctlOptions) client() (*drainctl.Client, error) {
	cfg, err := o.conn.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("loading the kubeconfig: %w", err)
	}
	cfg.UserAgent = "node-agent-ctl"
	return drainctl.New(cfg, drainctl.Options{KubeVirtNamespace: o.kubeVirtNamespace, DrainTaintKey: o.drainTaintKey,
		MigrationStallTimeout: o.migrationStall})
}

// config resolves the drain taint key as the agents do. A source that does not decide
// the key is warned about; a key that cannot be told is an error.
func (o *ctlOptions) config(ctx context.Context, c *drainctl.Client) (nodeinfo.Config, error) {
	cfg, warning, err := c.Config(ctx)
	if err != nil {
		return cfg, fmt.Errorf("%w; name the key with --drain-taint-key", err)
	}
	if warning != nil {
		fmt.Fprintf(o.stderr, "warning: %v (using taint key %s from %s)\n", warning, cfg.DrainTaintKey, cfg.DrainTaintKeySource)
	}
	return cfg, nil
}

// newCtlCommand is the root of the workstation commands, in kubectl's style: kubectl's
// connection flags and help layout.
func newCtlCommand(ctx context.Context, stdout, stderr io.Writer) *cobra.Command {
	o := &ctlOptions{conn: genericclioptions.NewConfigFlags(true), stdout: stdout, stderr: stderr}
	// Neither a namespace nor a discovery cache has a use here.
	o.conn.Namespace, o.conn.CacheDir = nil, nil
	root := &cobra.Command{
		Use:           "node-agent",
		Short:         "Take a KubeVirt node out of service without losing a VM",
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			if o.drainTaintKey != "" {
				if err := nodeinfo.ValidateTaintKey(o.drainTaintKey); err != nil {
					return usageError{fmt.Errorf("--drain-taint-key: %w", err)}
				}
			}
			if o.migrationStall <= 0 {
				return usageError{fmt.Errorf("--migration-stall-timeout %s: must be positive", o.migrationStall)}
			}
			return nil
		},
	}
	if strings.HasPrefix(filepath.Base(os.Args[0]), "kubectl-") {
		root.Annotations = map[string]string{cobra.CommandDisplayNameAnnotation: "kubectl node-agent"}
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetContext(ctx)
	flags := root.PersistentFlags()
	o.conn.AddFlags(flags)
	flags.StringVar(&o.kubeVirtNamespace, "kubevirt-namespace", "kubevirt", "The namespace of the KubeVirt CR and the legacy kubevirt-config ConfigMap.")
	flags.StringVar(&o.drainTaintKey, "drain-taint-key", "", "The drain taint key. If empty, it is resolved as the agents resolve it: the KubeVirt CR, the legacy ConfigMap, kubevirt.io/drain.")
	flags.DurationVar(&o.migrationStall, "migration-stall-timeout", agent.DefaultMigrationStallTimeout, "A VM whose migration has stayed this long in Scheduled, PreparingTarget or TargetReady is shown blocked, as the agents' flag of that name.")
	options := newOptionsCommand(stdout)
	root.AddCommand(newDrainCommand(o), newUndrainCommand(o), newStatusCommand(o), options)
	useKubectlHelp(root, options)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageError{err} })
	return root
}

// newOptionsCommand is kubectl's `options`: the flags every command takes.
func newOptionsCommand(out io.Writer) *cobra.Command {
	c := &cobra.Command{
		Use:   "options",
		Short: "Print the list of flags inherited by all commands",
		Run:   func(c *cobra.Command, _ []string) { _ = c.Usage() },
	}
	c.SetOut(out)
	c.SetErr(out)
	return c
}

// oneNode takes exactly one NODE argument.
func oneNode(_ *cobra.Command, args []string) error {
	switch len(args) {
	case 0:
		return usageError{errors.New("which node? NODE is required")}
	case 1:
		return nil
	default:
		return usageError{fmt.Errorf("one node at a time: got %s", strings.Join(args, ", "))}
	}
}

// ctlMain runs a workstation command; args start with the command's name. It returns
// the exit status.
func ctlMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newCtlCommand(ctx, stdout, stderr)
	root.SetArgs(args)
	c, err := root.ExecuteC()
	var usage usageError
	var exit exitError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &exit):
		return int(exit)
	case errors.As(err, &usage):
		fmt.Fprintf(stderr, "%s: %v\nSee '%s --help' for usage.\n", c.CommandPath(), err, c.CommandPath())
		return exitUsage
	default:
		fmt.Fprintf(stderr, "%s: %v\n", c.CommandPath(), err)
		return exitFailed
	}
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// runArgs are the flags of `node-agent run`.
type runArgs struct {
	Kubeconfig        string
	NodeName          string
	DrainTaintKey     string
	KubeVirtNamespace string
	AllPods           bool
	ListenAddress     string
	Resync            time.Duration
	MigrationStall    time.Duration
	PodEvictionRetry  time.Duration
	QPS               float64
	Burst             int
	LogFormat         string
	LogLevel          string
	ShutdownInhibitor bool
	ShutdownTimeout   time.Duration
	ShutdownAllPods   bool
	InhibitMode       string
	LogindDropInDir   string
	LockHolder        string
	Namespace         string
	MaxDrains         int
	MaxTurnWait       time.Duration
	Profiling         bool
}

// envPrefix: every flag can also be set as NODE_AGENT_<FLAG> (dashes as underscores);
// a flag given on the command line wins.
const envPrefix = "NODE_AGENT_"

func newRunFlags(a *runArgs, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("node-agent run", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&a.Kubeconfig, "kubeconfig", "", "path of a kubeconfig file; empty: the in-cluster service account")
	fs.StringVar(&a.NodeName, "node-name", "", "the node this agent drains; default: the NODE_NAME environment variable (set from the downward API)")
	fs.StringVar(&a.DrainTaintKey, "drain-taint-key", "", "drain taint key (effect NoSchedule); overrides the KubeVirt CR's migrations.nodeDrainTaintKey, the legacy kubevirt-config ConfigMap and the default "+nodeinfo.DefaultDrainTaintKey)
	fs.StringVar(&a.KubeVirtNamespace, "kubevirt-namespace", "kubevirt", "namespace of the KubeVirt CR and of the legacy kubevirt-config ConfigMap")
	fs.BoolVar(&a.AllPods, "all-pods", false, "during a drain also evict every other pod, as kubectl drain --ignore-daemonsets --delete-emptydir-data --force would")
	fs.StringVar(&a.ListenAddress, "listen-address", ":8095", "address of /safe-to-shutdown, /healthz, /readyz and /metrics")
	fs.DurationVar(&a.Resync, "resync", 5*time.Second, "how often a drain in progress is looked at again (changes are seen at once)")
	fs.DurationVar(&a.MigrationStall, "migration-stall-timeout", agent.DefaultMigrationStallTimeout, "a VM whose migration stays this long in a phase that the target node's virt-handler moves on (Scheduled, PreparingTarget, TargetReady; KubeVirt times none of them out) is reported blocked, with a DrainBlocked event; the migration is left to run")
	fs.DurationVar(&a.PodEvictionRetry, "pod-eviction-retry", 5*time.Second, "first pause before retrying a refused eviction of another pod (--all-pods): a budget's 429 or any other error; it doubles up to 1m")
	fs.Float64Var(&a.QPS, "kube-api-qps", 100, "queries per second to the API server (enough to act on 100 VMs at once)")
	fs.IntVar(&a.Burst, "kube-api-burst", 300, "burst of queries to the API server")
	fs.BoolVar(&a.ShutdownInhibitor, "shutdown-inhibitor", true, "hold host shutdowns and reboots with a logind inhibitor lock until the node is drained (needs the host's system D-Bus)")
	fs.DurationVar(&a.ShutdownTimeout, "shutdown-timeout", 10*time.Minute, "the longest a host shutdown is held for the drain; logind's InhibitDelayMaxSec is raised to it where allowed, and the smaller of the two applies")
	fs.BoolVar(&a.ShutdownAllPods, "shutdown-all-pods", false, "on a host shutdown, also evict every other pod (as --all-pods does for the drain taint)")
	fs.StringVar(&a.InhibitMode, "inhibit-mode", "delay", "delay: hold a shutdown until the node is drained; block: also refuse a shutdown while VMs are on the node (a delay lock is kept too)")
	fs.StringVar(&a.LogindDropInDir, "logind-dropin-dir", "/etc/systemd/logind.conf.d", "logind.conf.d folder of the host, where InhibitDelayMaxSec is raised; empty: never write it")
	fs.StringVar(&a.LockHolder, "lock-holder", "", "URL of the shutdown lock holder (`node-agent inhibit`, a second container of the pod), e.g. http://127.0.0.1:8096: the engine follows it and holds no lock itself, so a crash of the engine does not drop the lock; empty: hold the lock in this process (a crash of it drops the lock; --inhibit-mode, --logind-dropin-dir and --shutdown-timeout apply here then)")
	fs.StringVar(&a.Namespace, "namespace", "node-agent", "the agent's namespace, where the agents of the cluster keep the Leases of their turns to drain for host shutdowns (the DaemonSet sets NODE_AGENT_NAMESPACE from the downward API)")
	fs.IntVar(&a.MaxDrains, "max-concurrent-drains", 1, "at most this many nodes of the cluster drain for a host shutdown at once (the others keep their shutdowns held and wait their turn, first come first served, with a PreferNoSchedule taint); every agent of the cluster must have the same value; 0: no coordination, each node drains at once")
	fs.DurationVar(&a.MaxTurnWait, "max-turn-wait", agent.DefaultMaxTurnWait, "a node whose turn to drain for a host shutdown has not come this long after the shutdown began drains out of turn (a Warning event says so); keep --shutdown-timeout above it by the time a drain takes")
	fs.StringVar(&a.LogFormat, "log-format", "text", "log format: text or json")
	fs.BoolVar(&a.Profiling, "profiling", false, "also serve Go's profiles (net/http/pprof) at /debug/pprof/ on --listen-address")
	fs.StringVar(&a.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	return fs
}

// inhibitArgs are the flags of `node-agent inhibit`, the shutdown lock holder.
type inhibitArgs struct {
	NodeName        string
	ListenAddress   string
	EngineURL       string
	ShutdownTimeout time.Duration
	InhibitMode     string
	LogindDropInDir string
	LogFormat       string
	LogLevel        string
}

func newInhibitFlags(a *inhibitArgs, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("node-agent inhibit", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&a.NodeName, "node-name", "", "the node (for the lock's description); default: the NODE_NAME environment variable")
	fs.StringVar(&a.ListenAddress, "listen-address", "127.0.0.1:8096", "address of GET /v1/shutdown (the state the engine follows) and /healthz; keep it on localhost")
	fs.StringVar(&a.EngineURL, "engine-url", "http://127.0.0.1:8095", "URL of the drain engine (`node-agent run`), asked GET /safe-to-shutdown?wait= during a shutdown")
	fs.DurationVar(&a.ShutdownTimeout, "shutdown-timeout", 10*time.Minute, "the longest a host shutdown is held, counted from when logind began it; logind's InhibitDelayMaxSec is raised to it where allowed, and the smaller of the two applies")
	fs.StringVar(&a.InhibitMode, "inhibit-mode", "delay", "delay: hold a shutdown until the node is drained; block: also refuse a shutdown outright (a delay lock is kept too)")
	fs.StringVar(&a.LogindDropInDir, "logind-dropin-dir", "/etc/systemd/logind.conf.d", "logind.conf.d folder of the host, where InhibitDelayMaxSec is raised; empty: never write it")
	fs.StringVar(&a.LogFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&a.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	return fs
}

// parseInhibitArgs parses and validates the flags of `node-agent inhibit`, with the
// environment (NODE_AGENT_<FLAG>) as defaults.
func parseInhibitArgs(args []string, getenv func(string) string, out io.Writer) (inhibitArgs, error) {
	var a inhibitArgs
	fs := newInhibitFlags(&a, out)
	if err := fs.Parse(args); err != nil {
		return a, err
	}
	if fs.NArg() > 0 {
		return a, fmt.Errorf("unexpected arguments %q: node-agent inhibit takes only flags", fs.Args())
	}
	errs := envDefaults(fs, getenv)
	if a.NodeName == "" {
		a.NodeName = getenv("NODE_NAME")
	}
	if _, _, err := net.SplitHostPort(a.ListenAddress); err != nil {
		errs = append(errs, fmt.Errorf("--listen-address %q: want host:port, such as 127.0.0.1:8096: %w", a.ListenAddress, err))
	}
	if u, err := url.Parse(a.EngineURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("--engine-url %q: want a URL such as http://127.0.0.1:8095", a.EngineURL))
	}
	errs = append(errs, validateHold(a.ShutdownTimeout, a.InhibitMode)...)
	if a.LogFormat != "text" && a.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("--log-format %q: want text or json", a.LogFormat))
	}
	if _, err := logrus.ParseLevel(a.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("--log-level: %w: want debug, info, warn or error", err))
	}
	return a, errors.Join(errs...)
}

// validateHold checks the flags of the shutdown hold, which run and inhibit share.
func validateHold(timeout time.Duration, mode string) []error {
	var errs []error
	if timeout <= 0 {
		errs = append(errs, fmt.Errorf("--shutdown-timeout %s: must be positive", timeout))
	}
	if mode != "delay" && mode != "block" {
		errs = append(errs, fmt.Errorf("--inhibit-mode %q: want delay or block", mode))
	}
	return errs
}

// envDefaults sets every flag not given on the command line from NODE_AGENT_<FLAG>.
func envDefaults(fs *flag.FlagSet, getenv func(string) string) []error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		env := envPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v := getenv(env); v != "" {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", env, v, err))
			}
		}
	})
	return errs
}

// parseRunArgs parses and validates the flags of `node-agent run`, with the
// environment as defaults. The error says what to fix.
func parseRunArgs(args []string, getenv func(string) string, out io.Writer) (runArgs, error) {
	var a runArgs
	fs := newRunFlags(&a, out)
	if err := fs.Parse(args); err != nil {
		return a, err
	}
	if fs.NArg() > 0 {
		return a, fmt.Errorf("unexpected arguments %q: node-agent run takes only flags", fs.Args())
	}
	errs := envDefaults(fs, getenv)
	if a.NodeName == "" {
		a.NodeName = getenv("NODE_NAME")
	}
	return a, errors.Join(append(errs, a.validate())...)
}

func (a runArgs) validate() error {
	var errs []error
	if a.NodeName == "" {
		errs = append(errs, errors.New("no node name: set --node-name or NODE_NAME (the DaemonSet sets it from spec.nodeName)"))
	}
	if a.DrainTaintKey != "" {
		if err := nodeinfo.ValidateTaintKey(a.DrainTaintKey); err != nil {
			errs = append(errs, fmt.Errorf("--drain-taint-key: %w", err))
		}
	}
	if a.KubeVirtNamespace == "" {
		errs = append(errs, errors.New("--kubevirt-namespace must not be empty"))
	}
	if _, _, err := net.SplitHostPort(a.ListenAddress); err != nil {
		errs = append(errs, fmt.Errorf("--listen-address %q: want host:port, such as :8095: %w", a.ListenAddress, err))
	}
	if a.Resync <= 0 {
		errs = append(errs, fmt.Errorf("--resync %s: must be positive", a.Resync))
	}
	if a.MaxDrains < 0 {
		errs = append(errs, fmt.Errorf("--max-concurrent-drains %d: must be 0 (no coordination) or more", a.MaxDrains))
	}
	if a.MaxDrains > 0 {
		if a.MaxTurnWait <= 0 {
			errs = append(errs, fmt.Errorf("--max-turn-wait %s: must be positive", a.MaxTurnWait))
		}
		if msgs := validation.IsDNS1123Label(a.Namespace); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("--namespace %q: not a namespace name: %s", a.Namespace, strings.Join(msgs, "; ")))
		}
	}
	if a.MigrationStall <= 0 {
		errs = append(errs, fmt.Errorf("--migration-stall-timeout %s: must be positive", a.MigrationStall))
	}
	if a.PodEvictionRetry <= 0 {
		errs = append(errs, fmt.Errorf("--pod-eviction-retry %s: must be positive (zero would retry in a busy loop)", a.PodEvictionRetry))
	}
	if a.QPS <= 0 || a.Burst <= 0 {
		errs = append(errs, fmt.Errorf("--kube-api-qps and --kube-api-burst must be positive"))
	}
	if a.LogFormat != "text" && a.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("--log-format %q: want text or json", a.LogFormat))
	}
	errs = append(errs, validateHold(a.ShutdownTimeout, a.InhibitMode)...)
	if a.LockHolder != "" {
		if u, err := url.Parse(a.LockHolder); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("--lock-holder %q: want a URL such as http://127.0.0.1:8096, or empty", a.LockHolder))
		}
	}
	if _, err := logrus.ParseLevel(a.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("--log-level: %w: want debug, info, warn or error", err))
	}
	if a.Kubeconfig != "" {
		if _, err := os.Stat(a.Kubeconfig); err != nil {
			errs = append(errs, fmt.Errorf("--kubeconfig: %w", err))
		}
	}
	return errors.Join(errs...)
}

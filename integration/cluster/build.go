// Package cluster starts a real Kubernetes control plane for the tests and the demo:
// etcd, kube-apiserver, kube-scheduler and kube-controller-manager, and KubeVirt's own
// virt-api and virt-controller, each built from a pinned Go module under
// integration/build and cached per machine.
package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
)

// Versions of the pinned control plane. They must match the modules under integration/build.
const (
	KubernetesVersion = "v1.37.2"
	EtcdVersion       = "v3.7.3"
	KubeVirtVersion   = "v1.8.0"
)

// Binaries are the paths of the built control-plane programs.
type Binaries struct {
	KubeAPIServer         string
	KubeScheduler         string
	KubeControllerManager string
	Etcd                  string
	VirtAPI               string
	VirtController        string
	KubeVirtManifests     string
}

// build is one `go build` in one of the pinned modules.
type build struct {
	name     string   // names the cache entry; default module
	module   string   // folder under integration/build
	version  string   // for the cache key and the message
	packages []string // what to build into the output folder
	ldflags  string
	why      string
}

var kubeVersionLDFlags = "-X k8s.io/component-base/version.gitVersion=" + KubernetesVersion +
	" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"

func builds() []build {
	return []build{
		{module: "etcd", version: EtcdVersion, packages: []string{"./cmd/etcd"},
			why: "etcd " + EtcdVersion},
		{module: "kube-apiserver", version: KubernetesVersion, packages: []string{"k8s.io/kubernetes/cmd/kube-apiserver"},
			ldflags: kubeVersionLDFlags, why: "kube-apiserver " + KubernetesVersion + " (the first build takes 4-15 minutes on 2 cores)"},
		// The same module and pins as the API server, a cache entry of its own so that
		// one can be rebuilt without the other.
		{name: "kube-controllers", module: "kube-apiserver", version: KubernetesVersion,
			packages: []string{"k8s.io/kubernetes/cmd/kube-scheduler", "k8s.io/kubernetes/cmd/kube-controller-manager"},
			ldflags:  kubeVersionLDFlags, why: "kube-scheduler and kube-controller-manager " + KubernetesVersion + " (the first build takes 5-17 minutes more on 2 cores)"},
		{module: "kubevirt", version: KubeVirtVersion,
			packages: []string{"kubevirt.io/kubevirt/cmd/virt-api", "kubevirt.io/kubevirt/cmd/virt-controller", "./cmd/kubevirt-manifests"},
			why:      "KubeVirt " + KubeVirtVersion + " virt-api and virt-controller (the first build takes 2-4 minutes)"},
	}
}

// BuildRoot is the folder that holds the pinned build modules (integration/build).
func BuildRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("cannot locate the integration/build folder")
	}
	root := filepath.Join(filepath.Dir(file), "..", "build")
	if _, err := os.Stat(filepath.Join(root, "kube-apiserver", "go.mod")); err != nil {
		return "", fmt.Errorf("locating the pinned build modules: %w", err)
	}
	return root, nil
}

// CacheDir is where built binaries are kept between runs: $NODE_AGENT_CACHE, else
// the user cache folder's node-agent.
func CacheDir() (string, error) {
	if d := os.Getenv("NODE_AGENT_CACHE"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding a cache folder (set NODE_AGENT_CACHE): %w", err)
	}
	return filepath.Join(d, "node-agent"), nil
}

// EnsureBinaries builds the control plane once per machine and version, and returns the
// cached binaries. Concurrent callers (several test binaries) wait on one lock, so each
// program is built once. Progress messages go to out.
func EnsureBinaries(ctx context.Context, out io.Writer) (Binaries, error) {
	root, err := BuildRoot()
	if err != nil {
		return Binaries{}, err
	}
	cache, err := CacheDir()
	if err != nil {
		return Binaries{}, err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return Binaries{}, fmt.Errorf("creating the cache folder: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(cache, "build.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return Binaries{}, fmt.Errorf("opening the build lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return Binaries{}, fmt.Errorf("taking the build lock: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck // released on close anyway

	dirs := map[string]string{}
	for _, b := range builds() {
		dir, err := ensureBuild(ctx, root, cache, b, out)
		if err != nil {
			return Binaries{}, err
		}
		dirs[b.entry()] = dir
	}
	return Binaries{
		Etcd:                  filepath.Join(dirs["etcd"], "etcd"),
		KubeAPIServer:         filepath.Join(dirs["kube-apiserver"], "kube-apiserver"),
		KubeScheduler:         filepath.Join(dirs["kube-controllers"], "kube-scheduler"),
		KubeControllerManager: filepath.Join(dirs["kube-controllers"], "kube-controller-manager"),
		VirtAPI:               filepath.Join(dirs["kubevirt"], "virt-api"),
		VirtController:        filepath.Join(dirs["kubevirt"], "virt-controller"),
		KubeVirtManifests:     filepath.Join(dirs["kubevirt"], "kubevirt-manifests"),
	}, nil
}

// entry names the build's cache folder.
func (b build) entry() string {
	if b.name != "" {
		return b.name
	}
	return b.module
}

func ensureBuild(ctx context.Context, root, cache string, b build, out io.Writer) (string, error) {
	moduleDir := filepath.Join(root, b.module)
	key, err := buildKey(moduleDir, b)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, b.entry()+"-"+b.version+"-"+key)
	done := filepath.Join(dir, ".complete")
	if _, err := os.Stat(done); err == nil {
		return dir, nil
	}
	fmt.Fprintf(out, "node-agent: building %s, once per machine, into %s ...\n", b.why, dir)
	start := time.Now()
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return "", fmt.Errorf("clearing %s: %w", tmp, err)
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", tmp, err)
	}
	args := []string{"build", "-o", tmp + string(filepath.Separator)}
	if b.ldflags != "" {
		args = append(args, "-ldflags", b.ldflags)
	}
	args = append(args, b.packages...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = moduleDir
	cmd.Env = os.Environ()
	cmd.Stdout = out
	cmd.Stderr = out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building %s in %s: %w", b.why, moduleDir, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		return "", fmt.Errorf("marking %s complete: %w", tmp, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return "", fmt.Errorf("replacing %s: %w", dir, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", fmt.Errorf("moving the build into %s: %w", dir, err)
	}
	fmt.Fprintf(out, "node-agent: built %s in %s\n", b.entry(), time.Since(start).Round(time.Second))
	return dir, nil
}

// buildKey hashes what decides the build's result: the module's go.mod, go.sum and own
// sources, the Go version and the build flags.
func buildKey(moduleDir string, b build) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n%v\n", runtime.Version(), b.version, b.ldflags, b.packages)
	err := filepath.WalkDir(moduleDir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		ext := filepath.Ext(path)
		if ext != ".go" && ext != ".mod" && ext != ".sum" {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(moduleDir, path)
		fmt.Fprintf(h, "%s %d\n", rel, len(data))
		h.Write(data)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hashing %s: %w", moduleDir, err)
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

package logind

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
)

const stubPkg = "./integration/logind/cmd/systemd1-stub"

// sourceDir is the directory of this package's source files; the harness is always run from
// source (go test), so the stub's source is found next to it.
func sourceDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate the harness source")
	}
	return filepath.Dir(file), nil
}

func moduleRoot(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod above %s", dir)
		}
	}
}

// stubHash identifies a build of the stub: Go version, go.mod and the stub's sources.
func stubHash(root, stubDir string) (string, error) {
	h := sha256.New()
	_, _ = io.WriteString(h, runtime.Version()+"\n"+runtime.GOOS+"/"+runtime.GOARCH+"\n")
	files := []string{filepath.Join(root, "go.mod")}
	entries, err := os.ReadDir(stubDir)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if !e.IsDir() {
			files = append(files, filepath.Join(stubDir, e.Name()))
		}
	}
	sort.Strings(files)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		_, _ = io.WriteString(h, f+"\n")
		_, _ = h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// buildStub returns the path of the systemd1 stub binary, building it with `go build` into a
// cache directory keyed by its sources, so repeated runs and parallel test binaries share it.
func buildStub(ctx context.Context) (string, error) {
	src, err := sourceDir()
	if err != nil {
		return "", err
	}
	root, err := moduleRoot(src)
	if err != nil {
		return "", err
	}
	sum, err := stubHash(root, filepath.Join(src, "cmd", "systemd1-stub"))
	if err != nil {
		return "", fmt.Errorf("hashing the stub's sources: %w", err)
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "node-agent-test")
	bin := filepath.Join(dir, "systemd1-stub-"+sum)
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(dir, "systemd1-stub-*.tmp")
	if err != nil {
		return "", err
	}
	_ = tmp.Close()
	defer os.Remove(tmp.Name())
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("the go command is needed to build the systemd1 stub: %w", err)
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", tmp.Name(), stubPkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", stubPkg, err, out)
	}
	if err := os.Rename(tmp.Name(), bin); err != nil {
		return "", err
	}
	return bin, nil
}

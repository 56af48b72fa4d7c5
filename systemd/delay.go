package systemd

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// delayPollInterval is how often the read-back of InhibitDelayMaxUSec is repeated after a reload.
const delayPollInterval = 50 * time.Millisecond

// effectiveDelay is how long a shutdown can be held: the smaller of what the agent wants and what
// logind allows; what logind allows when the agent wants nothing in particular.
func effectiveDelay(want, logind time.Duration) time.Duration {
	if want <= 0 || logind < want {
		return logind
	}
	return want
}

// needsRaise reports whether logind's InhibitDelayMaxSec must be raised for want. A larger value
// (the kubelet's, someone else's, or ours from an earlier run) is never lowered.
func needsRaise(want, logind time.Duration) bool {
	return want > 0 && logind < want
}

// dropInSeconds is the whole number of seconds written for want, rounded up.
func dropInSeconds(want time.Duration) int64 {
	return int64((want + time.Second - 1) / time.Second)
}

// dropInContent is the logind.conf.d file that raises InhibitDelayMaxSec to want.
func dropInContent(want time.Duration) []byte {
	return []byte(fmt.Sprintf(`# Written by node-agent: logind waits this long at most for the agent's shutdown inhibitor
# lock (--shutdown-timeout). A drop-in sorting later (e.g. the kubelet's 99-kubelet.conf) wins.
[Login]
InhibitDelayMaxSec=%d
`, dropInSeconds(want)))
}

// writeDropIn writes DropInName into dir atomically (logind reads only *.conf files, so the
// temporary file is never read half-written).
func writeDropIn(dir string, want time.Duration) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating logind drop-in folder: %w", err)
	}
	path := filepath.Join(dir, DropInName)
	tmp, err := os.CreateTemp(dir, "."+DropInName+".*.tmp")
	if err != nil {
		return "", fmt.Errorf("writing logind drop-in %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(dropInContent(want))
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return "", fmt.Errorf("writing logind drop-in %s: %w", path, err)
	}
	return path, nil
}

// adjustDelay reads logind's InhibitDelayMaxUSec, raises it through the drop-in and a reload when
// it is below WantDelay, reads it back, and records the effective delay. Only a failure to read
// the property is returned (logind is not answering); a failure to raise it is logged and shown in
// Status.DelayProblem, and the smaller delay is used.
func (g *Guard) adjustDelay(ctx context.Context, b bus) error {
	want, log := g.opts.WantDelay, g.opts.Log
	if _, err := g.reconcileDropIn(ctx, b); err != nil {
		return err
	}
	cur, err := b.InhibitDelayMax(ctx)
	if err != nil {
		return err
	}
	problem := ""
	if needsRaise(want, cur) {
		got, p, err := g.raiseDelay(ctx, b, cur)
		if err != nil {
			return err
		}
		cur, problem = got, p
	}
	eff := effectiveDelay(want, cur)
	g.mu.Lock()
	g.status.LogindDelay, g.status.EffectiveDelay, g.status.DelayProblem = cur, eff, problem
	g.mu.Unlock()
	fields := log.WithField("logindInhibitDelayMax", cur).WithField("wantDelay", want).WithField("effectiveDelay", eff)
	if problem != "" {
		fields.Warn("shutdown can be held for less than wanted: " + problem)
	} else {
		fields.Info("effective shutdown delay")
	}
	return nil
}

// raiseDelay writes the drop-in, reloads logind and reads InhibitDelayMaxUSec back until it reaches
// WantDelay or ReloadWait passes. It returns the value read back and, when that is still short,
// why.
func (g *Guard) raiseDelay(ctx context.Context, b bus, cur time.Duration) (time.Duration, string, error) {
	want, clk := g.opts.WantDelay, g.opts.Clock
	if g.opts.DropInDir == "" {
		return cur, fmt.Sprintf("logind's InhibitDelayMaxSec is %v and no drop-in folder is configured", cur), nil
	}
	path := filepath.Join(g.opts.DropInDir, DropInName)
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, dropInContent(want)) && g.reloaded {
		// Already in place and loaded once by this Guard: something else keeps the value lower.
		// Do not reload (and wait) again on every reconnection.
		return cur, fmt.Sprintf("logind reports InhibitDelayMaxSec=%v although %s asks for %ds: "+
			"a drop-in sorting after %s (such as 99-kubelet.conf) sets it lower", cur, path, dropInSeconds(want), DropInName), nil
	}
	if _, err := writeDropIn(g.opts.DropInDir, want); err != nil {
		return cur, err.Error(), nil
	}
	g.opts.Log.WithField("file", path).WithField("inhibitDelayMaxSec", dropInSeconds(want)).Info("raising logind's InhibitDelayMaxSec")
	if err := b.ReloadLogind(ctx); err != nil {
		return cur, fmt.Sprintf("%s written, but %v", path, err), nil
	}
	g.reloaded = true
	start := clk.Now()
	for {
		got, err := b.InhibitDelayMax(ctx)
		if err != nil {
			return cur, "", err
		}
		cur = got
		if cur >= want {
			return cur, "", nil
		}
		if clk.Since(start) >= g.opts.ReloadWait {
			return cur, fmt.Sprintf("logind still reports InhibitDelayMaxSec=%v after %s and a reload: "+
				"a drop-in sorting after %s (such as 99-kubelet.conf) sets it lower", cur, path, DropInName), nil
		}
		select {
		case <-ctx.Done():
			return cur, "", ctx.Err()
		case <-clk.After(delayPollInterval):
		}
	}
}

// defaultInhibitDelayMax is logind's InhibitDelayMaxSec when no configuration sets it.
const defaultInhibitDelayMax = 5 * time.Second

// parseTimespan reads a systemd time span as logind.conf takes it: plain seconds ("90"), or
// values with units ("1min 30s", "2h", "500ms"); "infinity" is the largest duration.
func parseTimespan(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "infinity" {
		return time.Duration(1<<63 - 1), true
	}
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(n) * time.Second, true
	}
	units := strings.NewReplacer("minutes", "m", "minute", "m", "min", "m", "seconds", "s", "second", "s", "sec", "s",
		"hours", "h", "hour", "h", "hr", "h", "msec", "ms", "usec", "us", " ", "")
	d, err := time.ParseDuration(units.Replace(v))
	return d, err == nil && d >= 0
}

// inhibitDelayIn reads InhibitDelayMaxSec from one logind configuration file ([Login]);
// found is false when the file does not set it (or cannot be read).
func inhibitDelayIn(path string) (d time.Duration, found bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	section := ""
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			section = strings.Trim(line, "[]")
		case section == "Login":
			k, v, ok := strings.Cut(line, "=")
			if ok && strings.TrimSpace(k) == "InhibitDelayMaxSec" {
				if got, ok := parseTimespan(v); ok {
					d, found = got, true
				}
			}
		}
	}
	return d, found
}

// othersDelay is InhibitDelayMaxSec as the configuration we can see sets it without our drop-in:
// logind.conf beside the folder (when visible), then the folder's other *.conf files in name
// order (the last one wins, as in logind); logind's default when none sets it.
func othersDelay(dir string) time.Duration {
	d := defaultInhibitDelayMax
	if v, ok := inhibitDelayIn(filepath.Join(filepath.Dir(dir), "logind.conf")); ok {
		d = v
	}
	names, _ := filepath.Glob(filepath.Join(dir, "*.conf"))
	sort.Strings(names)
	for _, name := range names {
		if filepath.Base(name) == DropInName {
			continue
		}
		if v, ok := inhibitDelayIn(name); ok {
			d = v
		}
	}
	return d
}

// reconcileDropIn makes an existing drop-in of ours (from this or an earlier run) say what is
// needed now, so that a stale one never lowers a larger value set elsewhere later: removed when
// the other configuration already allows WantDelay (or nothing is wanted), rewritten when it
// asks for another value. logind is reloaded when the file changed. It reports whether it did.
func (g *Guard) reconcileDropIn(ctx context.Context, b bus) (bool, error) {
	dir, want := g.opts.DropInDir, g.opts.WantDelay
	if dir == "" {
		return false, nil
	}
	path := filepath.Join(dir, DropInName)
	old, err := os.ReadFile(path)
	if err != nil {
		return false, nil // none of ours
	}
	others := othersDelay(dir)
	log := g.opts.Log.WithField("file", path).WithField("othersInhibitDelayMax", others).WithField("wantDelay", want)
	switch {
	case want <= 0 || others >= want:
		if err := os.Remove(path); err != nil {
			log.WithError(err).Warn("cannot remove our logind drop-in that is no longer needed")
			return false, nil
		}
		log.Info("removed our logind drop-in: the other configuration allows the wanted delay, and ours must not lower it")
	case !bytes.Equal(old, dropInContent(want)):
		if _, err := writeDropIn(dir, want); err != nil {
			log.WithError(err).Warn("cannot rewrite our stale logind drop-in")
			return false, nil
		}
		log.Info("rewrote our stale logind drop-in for the wanted delay")
	default:
		return false, nil
	}
	if err := b.ReloadLogind(ctx); err != nil {
		log.WithError(err).Warn("cannot reload logind after changing our drop-in")
		return true, nil
	}
	g.reloaded = true
	// logind applies a reload asynchronously: wait until the value changes, or ReloadWait.
	before, err := b.InhibitDelayMax(ctx)
	if err != nil {
		return true, err
	}
	clk, start := g.opts.Clock, g.opts.Clock.Now()
	for clk.Since(start) < g.opts.ReloadWait {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case <-clk.After(delayPollInterval):
		}
		if cur, err := b.InhibitDelayMax(ctx); err != nil || cur != before {
			return true, err
		}
	}
	return true, nil
}

// Command testreport reads `go test -json` on its standard input and prints what a plain
// `go test` prints (each package's result line and what it printed outside its tests, and
// the whole output of each failed test), then the tests that were skipped, each with
// the reason it gave. On CI (CI set to anything but "" or "false") a skipped test fails
// the run unless NODE_AGENT_ALLOW_SKIP allows it: a comma-separated list of test names
// (a name allows its subtests too), or "all". A skip is a part of the suite that did not
// run: CI must not turn green without it in silence. Last it prints the slowest
// top-level tests with their times, where a suite's minutes go.
//
//	go test -json ./... | go run ./hack/testreport
//
// Its exit status is 1 when a test or a package failed, or a skip is not allowed.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json's TestEvent, and the build events).
type event struct {
	Action     string
	Package    string
	ImportPath string
	Test       string
	Output     string
	Elapsed    float64 // seconds, on a test's pass, fail or skip
	Time       time.Time
}

// turnMarker starts the line a test logs when it gets its turn to run (the e2e
// package's slots and lanes): its time counts from there, not from its start, which
// the waiting for its turn is part of.
const turnMarker = "e2e: its turn after "

// topLevel is the top-level test of a test or subtest.
func topLevel(test string) string {
	top, _, _ := strings.Cut(test, "/")
	return top
}

// skip is a skipped test and what it said.
type skip struct {
	Package, Test, Reason string
}

// timing is a finished top-level test and how long it ran.
type timing struct {
	Package, Test string
	Seconds       float64
}

// result is what the run showed.
type result struct {
	failed bool
	skips  []skip
	times  []timing // top-level tests, in the order they finished
}

func main() {
	res, err := report(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(1)
	}
	slowest(os.Stdout, res.times, 10)
	if !verdict(os.Stdout, res, os.Getenv("CI"), os.Getenv("NODE_AGENT_ALLOW_SKIP")) {
		os.Exit(1)
	}
}

// report copies the run's output as a plain `go test` shows it and collects the skips.
func report(in io.Reader, out io.Writer) (result, error) {
	var res result
	buffered := map[string][]string{} // a running test's output, by package and name
	turn := map[string]time.Time{}    // when a top-level test got its turn, by package and name
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1024*1024), 64*1024*1024)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Fprintf(out, "%s\n", line) // not an event: go test's own message
			continue
		}
		key := e.Package + " " + e.Test
		topKey := e.Package + " " + topLevel(e.Test)
		if e.Action == "output" && strings.Contains(e.Output, turnMarker) && !e.Time.IsZero() {
			if _, seen := turn[topKey]; !seen {
				turn[topKey] = e.Time
			}
		}
		if e.Test != "" && !strings.Contains(e.Test, "/") && (e.Action == "pass" || e.Action == "fail") {
			seconds := e.Elapsed
			if at, ok := turn[topKey]; ok && !e.Time.IsZero() {
				seconds = e.Time.Sub(at).Seconds()
			}
			res.times = append(res.times, timing{Package: e.Package, Test: e.Test, Seconds: seconds})
		}
		switch {
		case e.Action == "build-output":
			fmt.Fprint(out, e.Output)
		case e.Action == "build-fail":
			res.failed = true
		case e.Test == "":
			// The package's own output and its result line ("ok", "FAIL", or "?" with
			// no test files: a skip of the package that is no test's).
			if e.Action == "output" && e.Output != "PASS\n" {
				fmt.Fprint(out, e.Output)
			}
			if e.Action == "fail" {
				res.failed = true
			}
		case e.Action == "output":
			buffered[key] = append(buffered[key], e.Output)
		case e.Action == "fail":
			res.failed = true
			fmt.Fprint(out, strings.Join(buffered[key], ""))
			delete(buffered, key)
		case e.Action == "skip":
			res.skips = append(res.skips, skip{Package: e.Package, Test: e.Test, Reason: reason(buffered[key])})
			fmt.Fprint(out, strings.Join(buffered[key], ""))
			delete(buffered, key)
		case e.Action == "pass":
			delete(buffered, key)
		}
	}
	return res, sc.Err()
}

// reason is what a skipped test logged, without the framework's own lines.
func reason(lines []string) string {
	var kept []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		kept = append(kept, t)
	}
	r := strings.Join(kept, " | ")
	if len(r) > 500 {
		r = r[:500] + "…"
	}
	return r
}

// slowest prints the n longest top-level tests, each from its turn (turnMarker) when it
// logged one: with the scenarios in parallel their times overlap, and the package's own
// time is the suite's.
func slowest(out io.Writer, times []timing, n int) {
	if len(times) == 0 {
		return
	}
	sorted := append([]timing(nil), times...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Seconds > sorted[j].Seconds })
	if len(sorted) > n {
		sorted = sorted[:n]
	}
	fmt.Fprintf(out, "testreport: the %d slowest of %d tests:\n", len(sorted), len(times))
	for _, t := range sorted {
		fmt.Fprintf(out, "  %7.1fs %s %s\n", t.Seconds, t.Package, t.Test)
	}
}

// verdict prints the skipped tests and says whether the run passes.
func verdict(out io.Writer, res result, ci, allow string) bool {
	ok := !res.failed
	if len(res.skips) == 0 {
		fmt.Fprintln(out, "testreport: no test was skipped")
		return ok
	}
	onCI := ci != "" && ci != "false"
	fmt.Fprintf(out, "testreport: %d skipped tests:\n", len(res.skips))
	var refused []string
	for _, s := range res.skips {
		mark := ""
		if onCI && !allowed(s.Test, allow) {
			mark = " [not allowed on CI]"
			refused = append(refused, s.Test)
		}
		fmt.Fprintf(out, "  SKIP %s %s%s: %s\n", s.Package, s.Test, mark, s.Reason)
	}
	if len(refused) > 0 {
		fmt.Fprintf(out, "testreport: FAIL: on CI (CI=%s) these tests must run: %s; set NODE_AGENT_ALLOW_SKIP to their names (comma-separated) or to all to accept that they did not (README: \"Tests that skip\")\n",
			ci, strings.Join(refused, ", "))
		return false
	}
	return ok
}

// allowed reports whether NODE_AGENT_ALLOW_SKIP's value allows test to skip.
func allowed(test, allow string) bool {
	for _, a := range strings.Split(allow, ",") {
		a = strings.TrimSpace(a)
		if a == "all" || (a != "" && (test == a || strings.HasPrefix(test, a+"/"))) {
			return true
		}
	}
	return false
}

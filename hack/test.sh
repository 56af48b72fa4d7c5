#!/usr/bin/env bash
# The whole test suite: set-up, formatting and static checks, then every test with the
# race detector, the end-to-end ones on a real control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
export PATH="$PATH:$(go env GOPATH)/bin"

unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi
go vet ./...
staticcheck ./...
# The linker's dead-code elimination: a reachable reflect.Value.Method or MethodByName
# (text/template's, kubectl's help templater's) makes it keep every exported method of
# every type, which made the binary 65 MB instead of 36 and each agent ~10 MiB larger
# in memory (cmd/node-agent/help.go). -dumpdep names such a caller "<ReflectMethod>".
if reflect=$(CGO_ENABLED=0 go build -trimpath -ldflags=-dumpdep -o /dev/null ./cmd/node-agent 2>&1 | grep '<ReflectMethod>'); then
	echo "the node-agent binary calls reflect's Method/MethodByName, which disables dead-code elimination:" >&2
	echo "$reflect" >&2
	exit 1
fi
# -json, read by hack/testreport: the output of a plain `go test`, then the skipped tests
# with their reasons; on CI (CI=true) a skipped test fails the run unless
# NODE_AGENT_ALLOW_SKIP names it (README: "Tests that skip").
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
go build -o "$report/testreport" ./hack/testreport
# The e2e scenarios run side by side, NODE_AGENT_E2E_PARALLEL at once (default 3; 1 runs
# them one after another), counted by the e2e package itself (README: "The two
# commands"); go test's own -parallel is far higher, so that a test waiting for its
# turn (the cluster-wide tests' cluster, the container tier) holds none of them.
export NODE_AGENT_E2E_PARALLEL="${NODE_AGENT_E2E_PARALLEL:-3}"
go test -race -count=1 -timeout 60m -parallel 64 -json ./... | "$report/testreport"

# A short fuzz run of every parser of input the agent reads (README: "Fuzzing"): each
# target for NODE_AGENT_FUZZTIME (default 5000x, a count of inputs; 0 skips), one at a
# time, as -fuzz takes one. A count, not a duration: Go 1.26 can fail a duration-bound run
# with "context deadline exceeded" and no input found (golang/go#75804). Their seed
# corpora (f.Add and testdata/fuzz) already ran above as unit tests. A finding fails the run and leaves the input in <package>/testdata/fuzz/<target>/.
fuzztime=${NODE_AGENT_FUZZTIME:-5000x}
if [ "$fuzztime" != 0 ]; then
	for pkg in ./nodeinfo ./agent ./systemd; do
		for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz'); do
			echo "fuzz $pkg $target for $fuzztime"
			go test -run '^$' -fuzz "^$target\$" -fuzztime "$fuzztime" "$pkg"
		done
	done
fi

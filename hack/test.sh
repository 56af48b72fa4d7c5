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
go test -race -count=1 -timeout 60m ./...

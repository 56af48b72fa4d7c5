#!/usr/bin/env bash
# The one build line of the node-agent binary. The Dockerfile runs it, and so does the
# test suite (integration/e2e/deploy_test.go builds with it and deploys that binary), so
# what CI tests is what the image ships: a static binary (CGO_ENABLED=0: the runtime image
# has no libc), reproducible (-trimpath, no VCS stamp), stripped.
#
# Usage: hack/build.sh [OUTPUT]   (default: bin/node-agent in the repository)
# GOOS and GOARCH from the environment are honoured (the Dockerfile's cross builds).
set -euo pipefail
out="$(realpath -m "${1:-$(dirname "$0")/../bin/node-agent}")"
cd "$(dirname "$0")/.."
CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags="-s -w" -o "$out" ./cmd/node-agent

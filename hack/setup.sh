#!/usr/bin/env bash
# Installs, once per machine, what the tests and the demo need: Debian packages (a real
# dbus-daemon and systemd-logind for the shutdown path; systemd-nspawn, to boot systemd
# in a container for the shutdown path's most real tier; curl, which measures the
# container's way to the API server), the pinned linters, and the
# pinned control plane (kube-apiserver, etcd, virt-api, virt-controller), built from
# the Go module proxy into the cache folder (the first build takes 10-20 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(dbus systemd util-linux mount systemd-container curl prometheus)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v staticcheck >/dev/null 2>&1 && [ ! -x "$(go env GOPATH)/bin/staticcheck" ]; then
	echo "setup: installing staticcheck"
	go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi

go run ./integration/cmd/testcluster build >/dev/null

# syntax=docker/dockerfile:1
# node-agent's image: docker build -t REGISTRY/node-agent:TAG .
# (manifests/base/daemonset.yaml runs it; pin the tag there with a kustomize overlay.)

# Build on the builder's platform, for the target's (GOOS/GOARCH): no emulation.
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS
ARG TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The same build line as CI's (hack/build.sh): static, -trimpath, stripped.
RUN GOOS=$TARGETOS GOARCH=$TARGETARCH hack/build.sh /out/node-agent

# No shell, no libc, no package manager: the static binary and CA certificates.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/node-agent /node-agent
# Non-root by default (uid 65532): the image needs no privilege of its own. The DaemonSet
# runs the engine (`run`) so; only its lock-holder container (`inhibit`) runs as uid 0, for
# the host's system bus and logind's drop-in folder, and says why there
# (manifests/base/daemonset.yaml); with InhibitDelayMaxSec set on the hosts and polkit allowing
# delay locks, it can stay non-root too.
USER 65532:65532
ENTRYPOINT ["/node-agent"]
CMD ["run"]

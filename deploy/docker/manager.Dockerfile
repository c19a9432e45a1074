# syntax=docker/dockerfile:1.7
# arl-manager with its runtimes baked in: Python (the runtime package, its snapshot) and
# JavaScript (ARL's Boa reactor, built from runtimes/javascript into the binary, and its
# snapshot), each precompiled to .cwasm in a read-only cache, so a pod serves its first
# session without fetching or compiling anything. `ARL_RUNTIMES` (the WarmPool's runtime)
# picks which one a pod loads. It also carries `arl-exec`, the agent that container pools'
# pods run in their runtime image.
#
#   docker build -f deploy/docker/manager.Dockerfile -t ghcr.io/arl-dev/arl-manager:0.1.0 .
#
# The build context is the repository root. `arl-manager prepare` needs about 2 GB of RAM
# and a minute, and network access for `pip download`.

FROM rust:1.95-bookworm AS build
# python3 + pip are for `arl-manager prepare` only; they do not reach the final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
# runtimes/build.rs builds the JavaScript runtime for wasm32-wasip1; arl-exec is linked
# statically (musl, static-pie, stripped: about 5 MB) because container pools copy it into
# images of any libc, or none.
RUN rustup target add wasm32-wasip1 x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p arl-manager \
 && install -D -m 0755 target/release/arl-manager /out/arl-manager \
 && CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked -p arl-exec --target x86_64-unknown-linux-musl \
 && install -D -m 0755 target/x86_64-unknown-linux-musl/release/arl-exec /out/arl-exec
ENV ARL_CACHE_DIR=/opt/arl/cache
RUN /out/arl-manager prepare \
 && chmod -R a+rX,go-w "$ARL_CACHE_DIR"

# glibc from bookworm, like the build stage; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/arl-manager /usr/local/bin/arl-manager
# The executor agent of container pools: an init container copies it into the pod.
COPY --from=build /out/arl-exec /usr/local/bin/arl-exec
# Owned by root and read-only to the manager (uid 65532).
COPY --from=build /opt/arl/cache /opt/arl/cache
# Snapshots and suspended sessions go beside the workspaces, on the pod's writable volume (the
# cache is read-only); a pool's sessionStore (an S3 bucket) replaces it so that managers resume
# each other's. glibc's malloc keeps two arenas and trims freed memory past 256 KiB: after a
# burst of sessions the manager gives back what they used (BENCHMARKS.md, "Sessions at rest").
ENV ARL_CACHE_DIR=/opt/arl/cache \
    ARL_LISTEN=0.0.0.0:8080 \
    ARL_GRPC_LISTEN=0.0.0.0:50051 \
    ARL_DATA_DIR=/var/lib/arl \
    ARL_STORE=/var/lib/arl/store \
    MALLOC_ARENA_MAX=2 \
    MALLOC_TRIM_THRESHOLD_=262144
USER 65532:65532
EXPOSE 8080 50051
ENTRYPOINT ["arl-manager"]
CMD ["serve"]

# syntax=docker/dockerfile:1.7
# arl-operator: the WarmPool and Sandbox controllers, the autoscaler and the gateway.
#
#   docker build -f deploy/docker/operator.Dockerfile -t ghcr.io/arl-dev/arl-operator:0.1.0 .
#
# The build context is the repository root.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p arl-operator --bin arl-operator \
 && install -D -m 0755 target/release/arl-operator /out/arl-operator

# glibc from bookworm, like the build stage; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/arl-operator /usr/local/bin/arl-operator
USER 65532:65532
EXPOSE 8080 50051
ENTRYPOINT ["arl-operator"]
CMD ["run"]

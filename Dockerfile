# syntax=docker/dockerfile:1
# insights-enricher container image: a Rust build stage (librdkafka is built
# from source by rdkafka-sys, hence the C toolchain), then a slim runtime with
# only the shared libraries the binary links and the CA roots librdkafka uses.

ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build

# Dependencies first, against placeholder sources, so a source-only change
# reuses this layer instead of rebuilding librdkafka and every crate.
COPY Cargo.toml Cargo.lock ./
# The manifest names the benchmark target; its source must exist to build.
COPY benches ./benches
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY config ./config
COPY schemas ./schemas
COPY src ./src
# The placeholder build left newer artifacts for the package's own crate;
# touching the sources makes cargo rebuild it from the real code.
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked \
 && install -m 0755 target/release/insights-enricher /usr/local/bin/insights-enricher \
 && /usr/local/bin/insights-enricher --version

FROM debian:${DEBIAN_SUITE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 insights \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin insights
COPY --from=builder /usr/local/bin/insights-enricher /usr/local/bin/insights-enricher

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
# /metrics, /healthz, /readyz
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/insights-enricher"]
CMD ["run"]

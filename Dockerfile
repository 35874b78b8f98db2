# uincall-enricher container image.
#   docker build -t uincall-enricher:0.1.0 .
# Stage 1 builds dependencies from the manifests alone, so a source change
# rebuilds only the crate itself: src/main.rs, src/lib.rs and each bench the
# manifest declares get an empty stub (the bench names are read from
# Cargo.toml, so a new bench needs no change here). tests/deploy replays the
# build stage without a container engine (test_dockerfile.py).
FROM rust:1.95-bookworm AS build
# librdkafka is built with cmake (with libcurl, for OAUTHBEARER/OIDC).
RUN command -v cmake >/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*)
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && for bench in $(sed -n '/^\[\[bench\]\]/,/^name/s/^name = "\(.*\)"/\1/p' Cargo.toml); do \
      echo 'fn main() {}' > "benches/$bench.rs"; \
    done \
 && cargo build --release --locked --bin uincall-enricher \
 && rm -rf src benches
COPY config ./config
COPY src ./src
COPY benches ./benches
COPY tests/fixtures ./tests/fixtures
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin uincall-enricher

FROM debian:bookworm-slim
ARG VERSION=0.1.0
# The commit built and the URL of its source, given by the build, e.g.
#   --build-arg REVISION="$(git rev-parse HEAD)" --build-arg SOURCE=https://git.example.com/uincall-enricher
# Cargo.toml names no repository, so neither has a default: the labels are
# empty without them (the OCI annotation rules allow an empty value). No
# licenses label: Cargo.toml declares no licence.
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="uincall-enricher" \
      org.opencontainers.image.description="Enriches Uincall call-ended events from Kafka with the call record from the Uincall OpenAPI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin enricher
COPY --from=build /src/target/release/uincall-enricher /usr/local/bin/uincall-enricher
USER 10001:10001
# Two glibc malloc arenas instead of one per thread for librdkafka's own
# allocations (the Rust side uses mimalloc): less resident memory at a
# large window (docs/benchmarks.md).
ENV MALLOC_ARENA_MAX=2
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/uincall-enricher"]
CMD ["run"]

# syntax=docker/dockerfile:1.7
# One image with every mailmesh binary (the list: image/binaries); the Helm chart runs
# the one each workload needs (`command: ["/usr/local/bin/<service>"]`).
#
#   docker build -t ghcr.io/mailmesh/mailmesh:dev .
#
# Build stage: the same toolchain as CI (rust-toolchain is the machine's 1.95), plus
# what the C parts need: librdkafka (make, gcc, zlib, OpenSSL) and aws-lc (cmake).
FROM rust:1.95-bookworm AS build
# Debian stable's build tools are not pinned: point releases carry security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake build-essential pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir /out \
 && while read -r bin; do \
      case "$bin" in ''|'#'*) continue ;; esac; \
      cp "target/release/$bin" /out/ || exit 1; \
    done < image/binaries

# Runtime: glibc, CA certificates and nothing else; no shell, no package manager.
# The chart runs it as a non-root user with a read-only root filesystem.
# image/packages names this image and the Debian packages it is made of;
# scripts/image.sh builds the same image from those packages without a registry,
# takes USER, ENTRYPOINT and CMD from here, runs it, and fails if the two drift.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mailctl"]
CMD ["--help"]

# sheepdog: one image for every command (migrate, worker, enqueue, status, limits,
# mock-upstream, ...). `docker build -t sheepdog .`, then e.g.
#   docker run --rm sheepdog --help
#   docker run --rm -e DATABASE_URL=... -e AMQP_URL=... sheepdog migrate
#
# Works with the classic builder and with BuildKit (no cache mounts needed).

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
# .cargo/config.toml: the allocator's compile-time settings (memory per call in flight).
COPY .cargo ./.cargo
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The crate itself. migrations/ (sqlx::migrate!), prices.json and
# examples/demo-batch.jsonl (include_str!) are compiled into the binary.
COPY src ./src
COPY migrations ./migrations
COPY prices.json ./prices.json
COPY examples ./examples
# COPY keeps the files' own mtimes, which can be older than the placeholder
# build above: drop the crate's fingerprints so cargo rebuilds it for sure.
RUN rm -rf target/release/.fingerprint/sheepdog-* \
 && cargo build --release --locked \
 && install -m 0755 target/release/sheepdog /usr/local/bin/sheepdog \
 && /usr/local/bin/sheepdog --version

# The image's whole root filesystem: the binary, the C runtime it links, the CA
# certificates and the user entry (scripts/image-rootfs; tests/image.rs runs the
# worker from the same tree under chroot, since no Docker engine runs in CI).
COPY scripts/image-rootfs ./scripts/image-rootfs
RUN scripts/image-rootfs /usr/local/bin/sheepdog /rootfs

# ---------------------------------------------------------------- run
# Empty but for that tree: no shell, no package manager.
FROM scratch
COPY --from=builder /rootfs/ /

# Inside a container the default 127.0.0.1:9090 cannot be probed or scraped from
# outside; listen on every interface instead (override with SHEEPDOG_METRICS_ADDR).
ENV SHEEPDOG_METRICS_ADDR=0.0.0.0:9090
EXPOSE 9090

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# The binary checks itself: `sheepdog healthcheck` asks /healthz (`--ready`: /readyz).
# Kubernetes should use httpGet probes on /healthz (liveness) and /readyz (readiness).
HEALTHCHECK --interval=10s --timeout=6s --retries=3 CMD ["/usr/local/bin/sheepdog", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/sheepdog"]
CMD ["worker"]

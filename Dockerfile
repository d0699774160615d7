# imagegate container image: multi-stage build, small non-root runtime.
# No Docker engine runs on the development machines, so this file is kept correct by construction:
# tests/dockerfile.rs checks that the build stage copies everything the compiler embeds (the migrations,
# every include_str!/include_bytes! file) and that the paths cited here exist. How to run it: docs/deployment.md.
# Build with `docker build -t imagegate .`.

# --- build stage: dependencies cached in their own layer --------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Build dependencies first against an empty crate so source edits don't rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/imagegate-* target/release/deps/imagegate-* \
        target/release/deps/libimagegate-*
# Everything the build reads: the sources (with src/limits/reserve.lua) and the migrations embedded by
# sqlx::migrate!("./migrations").
COPY src ./src
COPY migrations ./migrations
# The built-in model catalog, embedded by include_str! in src/catalog.rs.
COPY config/models.toml ./config/models.toml
RUN cargo build --release --locked && strip target/release/imagegate

# --- runtime stage ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 imagegate \
    && useradd --system --uid 10001 --gid imagegate --home-dir /var/lib/imagegate --shell /usr/sbin/nologin imagegate \
    && mkdir -p /etc/imagegate /var/lib/imagegate \
    && chown imagegate:imagegate /var/lib/imagegate
COPY --from=build /src/target/release/imagegate /usr/local/bin/imagegate
COPY config/default.toml /etc/imagegate/default.toml
WORKDIR /var/lib/imagegate
# Listen on all interfaces inside the container; logs as JSON for collectors.
ENV IMAGEGATE__SERVER__LISTEN=0.0.0.0:8080 \
    IMAGEGATE__LOG__FORMAT=json
# Set IMAGEGATE__SERVER__PUBLIC_URL to the address callers use: re-hosted image links point there (the
# gateway warns at startup when it is unset, as links would point at http://0.0.0.0:8080).
# /etc/imagegate: configuration (mount your own default.toml or pass --config); /var/lib/imagegate: data
# (the SQLite file, stored images under data/images, the generated link-signing key).
VOLUME ["/etc/imagegate", "/var/lib/imagegate"]
EXPOSE 8080
USER imagegate
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
# SIGTERM: /readyz turns 503 for server.shutdown_grace (5 s) while requests are still served, then in-flight
# requests drain until server.shutdown_timeout (30 s) after the signal. Give the container that long to stop
# (`docker stop -t 35`, compose `stop_grace_period: 35s`, Kubernetes `terminationGracePeriodSeconds: 35`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/imagegate"]
CMD ["serve", "--config-dir", "/etc/imagegate"]

# imagegate container image: multi-stage build, small non-root runtime.
# No Docker engine runs on the development machines, so this file is kept correct by construction and
# reviewed against docs/deployment.md; build with `docker build -t imagegate .`.

# --- build stage: dependencies cached in their own layer --------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Build dependencies first against an empty crate so source edits don't rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/deps/imagegate* target/release/deps/libimagegate*
COPY src ./src
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
# Set IMAGEGATE__SERVER__PUBLIC_URL to the address callers use: re-hosted image links point there.
# /etc/imagegate: configuration (mount your own default.toml or pass --config); /var/lib/imagegate: data
# (the SQLite file, stored images under data/images, the generated link-signing key).
VOLUME ["/etc/imagegate", "/var/lib/imagegate"]
EXPOSE 8080
USER imagegate
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/imagegate"]
CMD ["serve", "--config-dir", "/etc/imagegate"]

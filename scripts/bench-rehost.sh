#!/usr/bin/env bash
# Benchmark re-hosting: `scripts/bench-rehost.sh [--images N] [--concurrency C] [--size-mb 2] [--n K] ...`.
#
# Builds the release gateway binary and the bench_rehost example, then runs the example with the arguments
# given (all of them passed through; `--help` lists them). The example starts a fake OpenAI upstream that
# serves ~2 MB images, two gateways (images.rehost off = reference, on = measured), loads both, and prints
# a Markdown report on stdout (progress on stderr). Nothing outside temporary directories is written.
# See docs/performance.md for what it measures and past results.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo build --release --bin imagegate --example bench_rehost" >&2
cargo build --release --bin imagegate --example bench_rehost

target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/examples/bench_rehost" --gateway-bin "$target_dir/release/imagegate" "$@"

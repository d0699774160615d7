#!/usr/bin/env bash
# Benchmark the response cache: `scripts/bench-cache.sh [--requests N] [--concurrency C] [--duration-s S] ...`.
#
# Builds the release gateway binary and the bench_cache example, then runs the example with the arguments given
# (all of them passed through; `--help` lists them). The example starts a fake OpenAI upstream in its own
# process, one gateway with `[cache] enabled = true`, and measures three series: straight to the fake, through
# the gateway as cache misses, through the gateway as cache hits. It prints a Markdown report on stdout
# (progress on stderr) and exits non-zero if a check failed. Nothing outside temporary directories is written.
# See docs/performance.md for what it measures and past results.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo build --release --bin imagegate --example bench_cache" >&2
cargo build --release --bin imagegate --example bench_cache

target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/examples/bench_cache" --gateway-bin "$target_dir/release/imagegate" "$@"

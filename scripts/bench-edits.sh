#!/usr/bin/env bash
# Peak memory of the gateway under big multipart edits: `scripts/bench-edits.sh [--concurrency 8] [--images 16] [--size-mb 4] [--bin OLD --bin NEW --rounds 2]`.
#
# Sends multipart edits of 16 PNG files of 4 MB each, 8 at a time, to the release gateway (re-hosting and
# cache off) in front of a fake upstream that reads every upload to its end, and reports the gateway's peak
# resident memory (VmHWM) against the bytes in flight (concurrency × upload size).
#
# Builds the release gateway binary and the bench_memory example, then runs the example with the arguments
# given (`--help` lists them); the report is Markdown on stdout. See docs/performance.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> cargo build --release --bin imagegate --example bench_memory" >&2
cargo build --release --bin imagegate --example bench_memory

target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/examples/bench_memory" edits "$@"

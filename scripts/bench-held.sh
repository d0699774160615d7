#!/usr/bin/env bash
# Peak memory of the gateway holding many requests: `scripts/bench-held.sh [--requests 5000] [--hold-s 15] [--bin OLD --bin NEW]`.
#
# Sends 5,000 generations at once to the release gateway in front of a fake upstream that answers each only
# after 15 s, so the gateway holds them all together; every one must complete. Reports the gateway's peak
# resident memory (VmHWM) and what each held request cost. Raises the open-files limit first (two sockets per
# held request in the gateway, two in this benchmark's process).
#
# Builds the release gateway binary and the bench_memory example, then runs the example with the arguments
# given (`--help` lists them); the report is Markdown on stdout. See docs/performance.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> cargo build --release --bin imagegate --example bench_memory" >&2
cargo build --release --bin imagegate --example bench_memory

target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/examples/bench_memory" held "$@"

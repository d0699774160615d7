#!/usr/bin/env bash
# Benchmark the web console over a year of usage: `scripts/bench-console.sh [--rows 1000000] [--db both] [--runs 5]`.
#
# Builds the console_bench example in release mode and runs it (arguments passed through): for SQLite and for
# PostgreSQL (IMAGEGATE_TEST_POSTGRES, default postgres://postgres@127.0.0.1:5432/test) it writes the rows,
# times the console's pages over HTTP and prints a Markdown report on stdout (progress on stderr). Nothing
# outside temporary directories and a temporary PostgreSQL database is written. Results: docs/console.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo build --release --example console_bench" >&2
cargo build --release --example console_bench

target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/examples/console_bench" "$@"

#!/usr/bin/env bash
# Fuzz imagegate's request parsers for a bounded time: `scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]`.
#
# Runs every cargo-fuzz target (or only the TARGETs named) for SECONDS_PER_TARGET seconds each (default 60)
# on the nightly toolchain (or stable with RUSTC_BOOTSTRAP=1 when nightly cannot be had), installing
# cargo-fuzz first if it is missing. Each target starts from and grows
# its committed corpus, fuzz/corpus/<target>/. Exits non-zero if any target crashes, leaks past the RSS limit
# or times out; the failing input is in fuzz/artifacts/<target>/. See docs/fuzzing.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]  (SECONDS_PER_TARGET: a positive integer)" >&2
  exit 2
fi
shift $(($# > 0 ? 1 : 0))

# cargo-fuzz passes -Z flags to rustc, which only nightly takes. Without nightly (and no way to fetch it: an
# offline machine), the installed stable toolchain is used with RUSTC_BOOTSTRAP=1, which lets stable take
# them. IMAGEGATE_FUZZ_TOOLCHAIN=stable forces that.
toolchain=${IMAGEGATE_FUZZ_TOOLCHAIN:-nightly}
if [[ $toolchain == nightly ]] && ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "==> installing the nightly toolchain (cargo-fuzz needs it)"
  if ! rustup toolchain install nightly --profile minimal; then
    echo "==> no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1 (see docs/fuzzing.md)" >&2
    toolchain=stable
  fi
fi
if [[ $toolchain != nightly ]]; then
  export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi
echo "==> toolchain: $(rustup run "$toolchain" rustc --version)${RUSTC_BOOTSTRAP:+ (RUSTC_BOOTSTRAP=1)}; $(cargo fuzz --version)"
summary=()

if (($# > 0)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

failed=()
for target in "${targets[@]}"; do
  corpus=fuzz/corpus/$target
  mkdir -p "$corpus"
  before=$(find "$corpus" -type f | wc -l)
  echo "==> fuzzing $target for ${seconds}s (corpus $corpus: $before files)"
  # -timeout: an input taking over 10 s is a hang, reported like a crash.
  log=$(mktemp)
  if cargo "+$toolchain" fuzz run "$target" "$corpus" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=10 -print_final_stats=1 2>&1 | tee "$log"; then
    after=$(find "$corpus" -type f | wc -l)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "==> $target: no crash; ${runs:-?} executions; corpus $before -> $after files"
    summary+=("$target: ${seconds}s, ${runs:-?} executions, 0 crashes")
  else
    failed+=("$target")
    summary+=("$target: CRASHED (fuzz/artifacts/$target/)")
    echo "==> $target: FAILED; the input is in fuzz/artifacts/$target/ (see docs/fuzzing.md)" >&2
  fi
  rm -f "$log"
done

echo "==> summary (for docs/fuzzing.md):"
printf '    %s\n' "${summary[@]}"
if ((${#failed[@]} > 0)); then
  echo "fuzzing failed for: ${failed[*]}" >&2
  exit 1
fi
echo "==> all targets ran ${seconds}s without a crash"

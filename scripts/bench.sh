#!/usr/bin/env bash
# The request path next to nginx: `scripts/bench.sh [--bin PATH]... [--duration S] [--connections C] [--rounds N]`.
#
# Reproduces the table of issue 17 on any Debian machine, in one run:
#   - nginx (Debian package, installed with apt when missing) as the mock upstream: a small `url` answer on one
#     port and a ~2.7 MB `b64_json` answer (2 MB image) on another, and as the reference reverse proxy in front
#     of each (HTTP/1.1 keep-alive to the upstream, default buffering);
#   - `wrk` (apt) against, in this order: nginx proxy (small), imagegate uncached (small), imagegate cache hit
#     (small), nginx proxy (2 MB), imagegate (2 MB pass-through);
#   - where the machine has two cores or more, the server under test is pinned to core 0 and wrk plus the mock
#     upstream to core 1 (taskset), so each server measured has one core to itself; only one server under test
#     runs at a time;
#   - imagegate with the usage ledger on SQLite, re-hosting off, the cache off (uncached, 2 MB) or on (hit, from
#     a third mock answer of the same size with `b64_json` instead of a link: with re-hosting off an upstream's
#     link is never cached; two probe requests check that the series really is answered from the cache), log
#     level warn; after each gateway has stopped (SIGTERM drains the ledger) the script counts the rows in
#     `usage_events` and fails unless every answered request has its row (requests cut by wrk at the end of a
#     series may add up to C more: they were served and are billed too).
# Several `--bin` alternate within each round (old and new binary on the same machine in the same minutes);
# `--rounds N` repeats everything. Prints requests/s, p99, CPU per request (µs, from /proc) and peak RSS of each
# server, and the ratio of each imagegate series to nginx of the same round, as Markdown on stdout (progress on
# stderr). Exits non-zero if a series had errors or non-2xx answers, or rows were missing. Everything is on
# 127.0.0.1 and in a temporary directory removed at the end (`--keep` keeps it). See docs/performance.md.
#
# `--perf` records each measured series (nginx's workers too) with `perf record -g` (real CPU, all threads) into
# `perf-LABEL.data` in the work directory (use with --keep; `perf report -i FILE --no-children`).
#
# `--floor` adds, after nginx in each round, four references that do only the HTTP part of a request, on core 0
# like the gateway: nginx answering the hit series' answer itself (`floor-static`), and `examples/bench_floor.rs`
# (built when missing; `--floor-bin PATH` to give one) answering it with hyper (`floor-answer`), with an axum
# router (`floor-axum`), and relaying the small series to the mock upstream with hyper's server and pooled
# client (`floor-proxy`). They bound what a cache hit and an uncached request can cost on this stack.
#
# `--callgrind` runs each gateway under valgrind's callgrind instead and adds the instructions per request of
# the measured series, all threads (ledger writer included): unlike time, repeatable on a busy machine. No
# nginx or 2 MB series then; use a short --duration and a small -c (callgrind is ~50x slower).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

bins=()
duration=10
warmup=2
connections=32
threads=1
rounds=1
big=1
keep=0
callgrind=0
perf=0
floor=0
floor_bin=""
usage() { sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bins+=("$2"); shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --connections | -c) connections=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --no-big) big=0; shift ;;
    --keep) keep=1; shift ;;
    --callgrind) callgrind=1; shift ;;
    --perf) perf=1; shift ;;
    --floor) floor=1; shift ;;
    --floor-bin) floor=1; floor_bin=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*" >&2; }

if [ ${#bins[@]} -eq 0 ]; then
  log "cargo build --release --bin imagegate"
  cargo build --release --bin imagegate >&2
  bins=("${CARGO_TARGET_DIR:-target}/release/imagegate")
fi
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }
done
if [ "$floor" = 1 ] && [ -z "$floor_bin" ]; then
  log "cargo build --release --example bench_floor"
  cargo build --release --example bench_floor >&2
  floor_bin="${CARGO_TARGET_DIR:-target}/release/examples/bench_floor"
fi

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# Cores: server under test on core 0, load generator and mock upstream on core 1.
if [ "$(nproc)" -ge 2 ]; then
  PIN_SERVER=(taskset -c 0)
  PIN_LOAD=(taskset -c 1)
  pinning="server under test on core 0; wrk and the mock upstream on core 1"
else
  PIN_SERVER=()
  PIN_LOAD=()
  pinning="one core: no pinning"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/imagegate-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$keep" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port)
BIG_PORT=$(free_port)
HIT_PORT=$(free_port)
PROXY_PORT=$(free_port)
PROXY_BIG_PORT=$(free_port)
HIT_PORT=$(free_port)
GW_PORT=$(free_port)
FLOOR_PORT=$(free_port)

# The mock's answers: a DALL·E-style link, and a GPT-style 2 MB image as base64 (random bytes behind a PNG
# signature: with re-hosting off the gateway passes them through untouched).
SMALL_ANSWER="{\"created\":1767225600,\"data\":[{\"url\":\"http://127.0.0.1:$MOCK_PORT/files/img-0001.png\",\"revised_prompt\":\"a red fox in the snow\"}]}"
# The cache-hit series needs an answer the cache may keep: with re-hosting off, an answer with the upstream's
# own (expiring) link is never stored, so a small `b64_json` answer (a 1x1 PNG, about the same size) instead.
PIXEL=iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==
HIT_ANSWER="{\"created\":1767225600,\"data\":[{\"b64_json\":\"$PIXEL\",\"revised_prompt\":\"a red fox in the snow\"}]}"
mkdir -p "$WORK/www/v1/images" "$WORK/tmp"
python3 - "$WORK/www/v1/images/generations" <<'EOF'
import base64, json, os, sys
image = b"\x89PNG\r\n\x1a\n" + os.urandom(2_000_000)
body = {"created": 1767225600, "data": [{"b64_json": base64.b64encode(image).decode()}],
        "background": "opaque", "output_format": "png", "quality": "high", "size": "1024x1024",
        "usage": {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172,
                  "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}}}
open(sys.argv[1], "w").write(json.dumps(body))
EOF
BIG_BYTES=$(stat -c %s "$WORK/www/v1/images/generations")
chmod -R a+rX "$WORK" # nginx's workers run as an unprivileged user when started as root

# nginx_conf NAME SERVERS: $WORK/NAME.conf, one worker without an access log, serving the given server blocks.
nginx_conf() {
  cat >"$WORK/$1.conf" <<EOF
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $WORK/tmp/$1-body;
  proxy_temp_path $WORK/tmp/$1-temp;
$2
}
EOF
}
nginx_conf mock "
  server {
    listen 127.0.0.1:$MOCK_PORT backlog=4096;
    location = /v1/images/generations { default_type application/json; return 200 '$SMALL_ANSWER'; }
  }
  server {
    listen 127.0.0.1:$HIT_PORT backlog=4096;
    location = /v1/images/generations { default_type application/json; return 200 '$HIT_ANSWER'; }
  }
  server {
    listen 127.0.0.1:$BIG_PORT backlog=4096;
    root $WORK/www;
    # The static module answers a POST to a file with 405: hand the file out as for a GET.
    location = /v1/images/generations { default_type application/json; error_page 405 =200 \$uri; }
  }"
nginx_conf proxy "
  upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 128; }
  upstream big { server 127.0.0.1:$BIG_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$PROXY_PORT backlog=4096;
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }
  server {
    listen 127.0.0.1:$PROXY_BIG_PORT backlog=4096;
    location / { proxy_pass http://big; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
# --floor: nginx answering the hit series' answer itself.
nginx_conf static "
  server {
    listen 127.0.0.1:$FLOOR_PORT backlog=4096;
    location = /v1/images/generations { default_type application/json; return 200 '$HIT_ANSWER'; }
  }"

wait_http() { # URL: until it answers at all, at most 120 s
  for _ in $(seq 1200); do
    curl -s -o /dev/null -m 1 "$1" && return 0
    sleep 0.1
  done
  echo "nothing answers at $1" >&2
  return 1
}

log "mock upstream (nginx) on 127.0.0.1:$MOCK_PORT and :$BIG_PORT (${BIG_BYTES} bytes)"
"${PIN_LOAD[@]}" "$NGINX" -p "$WORK" -c "$WORK/mock.conf" -g 'daemon off;' 2>>"$WORK/mock-error.log" &
pids+=($!)
wait_http "http://127.0.0.1:$MOCK_PORT/"

# One tenant without limits; its key as imagegate generates them (ig_<8 lowercase>_<32 alphanumeric>).
KEY_ID=$(python3 -c 'import random, string; print("".join(random.choices(string.ascii_lowercase + string.digits, k=8)))')
KEY="ig_${KEY_ID}_$(python3 -c 'import random, string; print("".join(random.choices(string.ascii_letters + string.digits, k=32)))')"
KEY_SHA=$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)

lua() { # NAME BODY: a wrk script that POSTs BODY as the bench tenant
  cat >"$WORK/$1.lua" <<EOF
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
EOF
}
lua small '{"model":"dall-e-2","prompt":"a red fox in the snow","n":1,"size":"256x256"}'
lua hit '{"model":"dall-e-2","prompt":"a red fox in the snow","n":1,"size":"256x256","response_format":"b64_json"}'
lua big '{"model":"gpt-image-1","prompt":"a red fox in the snow","size":"1024x1024","quality":"high"}'

cpu_ticks() { # PID...: utime + stime of these processes (all threads), in clock ticks
  local total=0 p
  for p in "$@"; do
    # fields after the command name (which may contain spaces): utime is the 12th, stime the 13th
    total=$((total + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}
TICK=$(getconf CLK_TCK)

# run_wrk LABEL URL SCRIPT PID...: warm-up, then the measured series; appends a result line to $WORK/results.
run_wrk() {
  local label=$1 url=$2 script=$3
  shift 3
  local out="$WORK/wrk-$label.txt"
  "${PIN_LOAD[@]}" wrk -t"$threads" -c"$connections" -d"${warmup}s" -s "$WORK/$script.lua" "$url" >"$WORK/warmup-$label.txt"
  local before after
  [ "$callgrind" = 1 ] && callgrind_control -z "$1" >/dev/null
  before=$(cpu_ticks "$@")
  local perf_pid=""
  if [ "$perf" = 1 ]; then
    perf record -q -F 1999 -g -o "$WORK/perf-$label.data" -p "$(echo "$@" | tr ' ' ',')" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  "${PIN_LOAD[@]}" wrk -t"$threads" -c"$connections" -d"${duration}s" --latency -s "$WORK/$script.lua" "$url" >"$out"
  after=$(cpu_ticks "$@")
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi
  local ir_per_request=""
  if [ "$callgrind" = 1 ]; then
    sleep 2 # the ledger's next batch (usage.flush_interval = 500ms) belongs to these requests
    callgrind_control -d "$1" >/dev/null
    sleep 1
    local dump
    dump=$(ls -t "$WORK"/gw-*/callgrind.out.* | head -1)
    ir_per_request=$(awk -v n="$(awk '/requests in/ {print $1}' "$out")" '/^(summary|totals):/ {t = $2} END {printf "%.0f", t / n}' "$dump")
    cp "$dump" "$WORK/callgrind-$label.out"
    log "$label: $ir_per_request instructions per request (callgrind, all threads)"
  fi
  local rps p99 total non2xx errors warm
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.2f", v}' "$out")
  total=$(awk '/requests in/ {print $1}' "$out")
  warm=$(awk '/requests in/ {print $1}' "$WORK/warmup-$label.txt")
  non2xx=$(cat "$out" "$WORK/warmup-$label.txt" | awk '/Non-2xx/ {s += $NF} END {print s + 0}')
  errors=$(cat "$out" "$WORK/warmup-$label.txt" | awk '/Socket errors/ {gsub(/,/, ""); s += $4 + $6 + $8 + $10} END {print s + 0}')
  local cpu_us
  cpu_us=$(awk -v t=$((after - before)) -v n="$total" -v hz="$TICK" 'BEGIN {printf "%.0f", n ? t * 1e6 / hz / n : 0}')
  log "$label: $rps req/s, p99 $p99 ms, $total requests (+$warm warm-up), CPU $cpu_us µs/request, non-2xx $non2xx, socket errors $errors"
  echo "$label $rps $p99 $total $warm $cpu_us $non2xx $errors $ir_per_request" >>"$WORK/results"
  echo $((total + warm)) >"$WORK/served-$label"
}

failed=0

# gateway LABEL BIN UPSTREAM_PORT CACHE: start imagegate on core 0 with its own data directory; sets GW_PID.
gateway_start() {
  local label=$1 bin=$2 upstream=$3 cache=$4 dir="$WORK/gw-$1"
  mkdir -p "$dir/data"
  cat >"$dir/imagegate.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
shutdown_timeout = "20s"
[log]
level = "warn"
[upstream]
base_url = "http://127.0.0.1:$upstream/v1"
api_key = "sk-bench-upstream-key"
[storage]
data_dir = "$dir/data"
[images]
rehost = false
[cache]
enabled = $cache
[[tenants]]
name = "bench"
keys = [{ id = "$KEY_ID", sha256 = "$KEY_SHA" }]
EOF
  local wrap=()
  [ "$callgrind" = 1 ] && wrap=(valgrind --tool=callgrind -q "--callgrind-out-file=$dir/callgrind.out.%p")
  (cd "$dir" && exec env -u RUST_LOG -u OPENAI_API_KEY "${PIN_SERVER[@]}" "${wrap[@]}" "$bin" serve --config "$dir/imagegate.toml") \
    >"$dir/out.log" 2>&1 &
  GW_PID=$!
  pids+=("$GW_PID")
  wait_http "http://127.0.0.1:$GW_PORT/healthz"
}

# gateway_stop LABEL SERIES...: SIGTERM, wait, then compare the ledger's rows with the requests served.
gateway_stop() {
  local label=$1 dir="$WORK/gw-$1"
  shift
  local hwm
  hwm=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$GW_PID/status")
  kill -TERM "$GW_PID"
  wait "$GW_PID" || { echo "$label exited non-zero: $(tail -5 "$dir/out.log")" >&2; failed=1; }
  local served=0 s
  for s in "$@"; do served=$((served + $(cat "$WORK/served-$s") + $(cat "$WORK/probe-$s" 2>/dev/null || echo 0))); done
  local rows
  rows=$(sqlite3 "$dir/data/imagegate.db" 'SELECT count(*) FROM usage_events')
  local cut=$((rows - served)) ok=yes
  if [ "$cut" -lt 0 ] || [ "$cut" -gt $((connections * 2 * $#)) ]; then ok=NO; failed=1; fi
  log "$label: ledger holds $rows rows for $served answered requests (+$cut cut at series ends): $ok; peak RSS $hwm MiB"
  echo "$label $rows $served $ok $hwm" >>"$WORK/ledger"
  if grep -q -E ' (WARN|ERROR) ' "$dir/out.log"; then
    log "$label logged warnings:"
    grep -E ' (WARN|ERROR) ' "$dir/out.log" | head -5 >&2
  fi
}

# expect_hit LABEL: the hit series' request, twice; the second must be answered from the cache (`x-imagegate-cache:
# hit`), or the series would measure something else (an uncached answer, or callers coalesced on one call).
expect_hit() {
  local body cache
  body=$(sed -n "s/^wrk.body = '\(.*\)'$/\1/p" "$WORK/hit.lua")
  for _ in 1 2; do
    cache=$(curl -s -o /dev/null -D - -X POST -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
      -d "$body" "http://127.0.0.1:$GW_PORT/v1/images/generations" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-imagegate-cache" {print $2}')
  done
  if [ "$cache" != hit ]; then
    echo "$1: the repeated request was not a cache hit (x-imagegate-cache: ${cache:-none})" >&2
    failed=1
  fi
  echo 2 >"$WORK/probe-$1"
}

nginx_proxy() { # LABEL PORT SCRIPT: one series against the reference proxy, on core 0
  "${PIN_SERVER[@]}" "$NGINX" -p "$WORK" -c "$WORK/proxy.conf" -g 'daemon off;' 2>>"$WORK/proxy-error.log" &
  local master=$!
  pids+=("$master")
  wait_http "http://127.0.0.1:$PROXY_PORT/"
  local workers
  workers=$(pgrep -P "$master" | tr '\n' ' ')
  # shellcheck disable=SC2086
  run_wrk "$1" "http://127.0.0.1:$2/v1/images/generations" "$3" "$master" $workers
  echo "$1 - - - $(awk '/VmHWM/ {s += $2} END {printf "%.0f", s / 1024}' /proc/"$master"/status $(printf '/proc/%s/status ' $workers))" >>"$WORK/ledger"
  kill -QUIT "$master"
  wait "$master" 2>/dev/null || true
}

# floor LABEL SCRIPT COMMAND...: one series against a reference server started by COMMAND on core 0, listening on
# FLOOR_PORT (its ratio is to nginx's proxy of the round, like the gateway's).
floor() {
  local label=$1 script=$2
  shift 2
  "${PIN_SERVER[@]}" "$@" 2>>"$WORK/floor-error.log" &
  local pid=$!
  pids+=("$pid")
  wait_http "http://127.0.0.1:$FLOOR_PORT/"
  local all
  all="$pid $(pgrep -P "$pid" | tr '\n' ' ' || true)"
  # shellcheck disable=SC2086
  run_wrk "$label" "http://127.0.0.1:$FLOOR_PORT/v1/images/generations" "$script" $all
  # shellcheck disable=SC2086
  echo "$label - - - $(for p in $all; do cat /proc/$p/status; done | awk '/VmHWM/ {s += $2} END {printf "%.0f", s / 1024}')" >>"$WORK/ledger"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
}

for round in $(seq "$rounds"); do
  log "round $round of $rounds"
  [ "$callgrind" = 1 ] || nginx_proxy "r$round-nginx" "$PROXY_PORT" small
  if [ "$floor" = 1 ] && [ "$callgrind" = 0 ]; then
    floor "r$round-floor-static" hit "$NGINX" -p "$WORK" -c "$WORK/static.conf" -g 'daemon off;'
    floor "r$round-floor-answer" hit "$floor_bin" answer --listen "127.0.0.1:$FLOOR_PORT" --body "$HIT_ANSWER"
    floor "r$round-floor-axum" hit "$floor_bin" axum --listen "127.0.0.1:$FLOOR_PORT" --body "$HIT_ANSWER"
    floor "r$round-floor-proxy" small "$floor_bin" proxy --listen "127.0.0.1:$FLOOR_PORT" --upstream "http://127.0.0.1:$MOCK_PORT"
  fi
  for i in "${!bins[@]}"; do
    b=${bins[$i]}
    tag="r$round-b$i"
    gateway_start "$tag-uncached" "$b" "$MOCK_PORT" false
    run_wrk "$tag-uncached" "http://127.0.0.1:$GW_PORT/v1/images/generations" small "$GW_PID"
    gateway_stop "$tag-uncached" "$tag-uncached"
    gateway_start "$tag-hit" "$b" "$HIT_PORT" true
    expect_hit "$tag-hit"
    run_wrk "$tag-hit" "http://127.0.0.1:$GW_PORT/v1/images/generations" hit "$GW_PID"
    gateway_stop "$tag-hit" "$tag-hit"
  done
  if [ "$big" = 1 ] && [ "$callgrind" = 0 ]; then
    nginx_proxy "r$round-nginx-2mb" "$PROXY_BIG_PORT" big
    for i in "${!bins[@]}"; do
      b=${bins[$i]}
      tag="r$round-b$i"
      gateway_start "$tag-2mb" "$b" "$BIG_PORT" false
      run_wrk "$tag-2mb" "http://127.0.0.1:$GW_PORT/v1/images/generations" big "$GW_PID"
      gateway_stop "$tag-2mb" "$tag-2mb"
    done
  fi
done

# The report.
echo "## imagegate next to nginx ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "wrk -t$threads -c$connections -d${duration}s (after ${warmup}s of warm-up) per series; $pinning; $(nproc) cores, $(uname -r);"
echo "$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'); ledger on SQLite; re-hosting off."
echo
for i in "${!bins[@]}"; do
  b=${bins[$i]}
  echo "- b$i: \`$b\` (sha256 $(sha256sum "$b" | cut -c1-12), built $(date -u -r "$b" +%Y-%m-%dT%H:%MZ))"
done
echo
echo "| round | series | requests/s | × nginx | p99 ms | p99 − nginx ms | CPU µs/request | peak RSS MiB | errors | ledger rows / answered | instructions/request |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
awk -v ledger="$WORK/ledger" '
  BEGIN { while ((getline line < ledger) > 0) { split(line, f, " "); rows[f[1]] = f[2]; served[f[1]] = f[3]; ok[f[1]] = f[4]; hwm[f[1]] = f[5] } }
  {
    label = $1; split(label, p, "-"); round = p[1]
    series = substr(label, length(round) + 2)
    ref = (series ~ /2mb$/) ? round "-nginx-2mb" : round "-nginx"
    if (label ~ /nginx/) { nrps[label] = $2; np99[label] = $3 }
    dp99 = (label ~ /nginx/ || !(ref in np99)) ? "–" : sprintf("%+.2f", $3 - np99[ref])
    led = (rows[label] == "-" || rows[label] == "") ? "–" : rows[label] " / " served[label] " " (ok[label] == "yes" ? "ok" : "MISSING")
    ratio = (label ~ /nginx/) ? "1" : (ref in nrps) ? sprintf("%.2f", $2 / nrps[ref]) : "–"
    printf "| %s | %s | %.0f | %s | %s | %s | %s | %s | %d | %s | %s |\n", round, series, $2, ratio, $3, dp99, $6, hwm[label], $7 + $8, led, ($9 == "" ? "–" : $9)
  }' "$WORK/results"

if awk '{ if ($7 + $8 > 0) bad = 1 } END { exit !bad }' "$WORK/results"; then
  echo "some series had errors or non-2xx answers" >&2
  failed=1
fi
exit "$failed"

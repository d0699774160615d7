#!/usr/bin/env bash
# The replica stack of compose.yaml as local processes, no Docker needed: two imagegate replicas (the mock
# upstream) behind nginx, sharing PostgreSQL, Redis and an S3-compatible store (moto), each with its own
# /metrics listener. The services come from .ci/services.sh (installed with apt/pip when missing).
#
#   scripts/stack.sh up       # start (a fresh database and Redis prefix each time); prints the addresses
#   scripts/stack.sh down     # stop what `up` started (by the pids it recorded)
#   scripts/stack.sh status   # what runs
#
# `up` writes .stack/stack.env (IMAGEGATE_STACK_*: the load balancer, each replica, each metrics listener,
# the admin and metrics tokens); `cargo test --test stack` reads it through IMAGEGATE_STACK_ENV.
#
# Environment: IMAGEGATE_BIN (default $CARGO_TARGET_DIR or target/, then debug/imagegate, built when missing), IMAGEGATE_STACK_DIR
# (default .stack), IMAGEGATE_STACK_PORT (default 18080: the load balancer; replicas on +1, +2, their
# metrics on +11, +12), IMAGEGATE_TEST_POSTGRES (the PostgreSQL server, as in .ci/run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${IMAGEGATE_STACK_DIR:-$ROOT/.stack}
BIN=${IMAGEGATE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/imagegate}
PORT=${IMAGEGATE_STACK_PORT:-18080}
PG_ADMIN=${IMAGEGATE_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
DB_NAME=imagegate_stack
BUCKET=imagegate-stack
REPLICAS=(1 2)

log() { printf '[stack] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# pid_of NAME: the recorded pid of NAME if that process is alive and is what we started.
pid_of() {
  local pid
  pid=$(cat "$STACK_DIR/$1.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -Eq 'imagegate|nginx' || return 1
  echo "$pid"
}

# wait_http URL SECONDS: until URL answers 200.
wait_http() {
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

down() {
  local name pid
  for name in nginx "${REPLICAS[@]/#/replica-}"; do
    if pid=$(pid_of "$name"); then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STACK_DIR/$name.pid"
  done
}

status() {
  local name pid
  for name in nginx "${REPLICAS[@]/#/replica-}"; do
    if pid=$(pid_of "$name"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done
}

nginx_conf() {
  local user="" servers="" n
  [[ $(id -u) -eq 0 ]] && user="user root root;"
  for n in "${REPLICAS[@]}"; do servers+="        server 127.0.0.1:$((PORT + n));"$'\n'; done
  cat <<EOF
# Written by scripts/stack.sh: the server block of deploy/nginx/imagegate.conf, for local replicas.
$user
worker_processes 1;
daemon off;
pid $STACK_DIR/nginx/nginx.pid;
error_log $STACK_DIR/nginx.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $STACK_DIR/nginx/body;
    proxy_temp_path $STACK_DIR/nginx/proxy;
    fastcgi_temp_path $STACK_DIR/nginx/fastcgi;
    uwsgi_temp_path $STACK_DIR/nginx/uwsgi;
    scgi_temp_path $STACK_DIR/nginx/scgi;
    upstream imagegate {
$servers        keepalive 16;
    }
    server {
        listen 127.0.0.1:$PORT;
        client_max_body_size 110m;
        proxy_read_timeout 660s;
        proxy_send_timeout 660s;
        proxy_buffering off;
        proxy_request_buffering off;
        location = /lb-health { return 200 "ok\n"; }
        location / {
            proxy_pass http://imagegate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            add_header X-Imagegate-Replica \$upstream_addr always;
        }
    }
}
EOF
}

up() {
  down
  mkdir -p "$STACK_DIR/nginx"
  # shellcheck source=../.ci/services.sh
  source "$ROOT/.ci/services.sh"
  ensure_redis || die "Redis could not be started"
  ensure_postgres || die "PostgreSQL could not be started"
  ensure_s3 || die "the S3-compatible store could not be started (see .ci/tmp/s3.log)"
  ensure_s3_bucket "$SVC_S3_ENDPOINT" "$BUCKET" || die "bucket $BUCKET is not usable at $SVC_S3_ENDPOINT"
  if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
    _svc_apt_install nginx || die "nginx could not be installed"
  fi
  local nginx_bin
  nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
  if [[ ! -x $BIN ]]; then
    log "building $BIN"
    (cd "$ROOT" && cargo build --quiet --bin imagegate)
  fi

  # A fresh database and Redis prefix each time: nothing left from an earlier run counts.
  PGOPTIONS="--client-min-messages=warning" psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null
  psql "$PG_ADMIN" -qc "CREATE DATABASE $DB_NAME" >/dev/null
  local db_url="${PG_ADMIN%/*}/$DB_NAME"
  local prefix="imagegate-stack-$(secret | head -c 8)"
  local signing_key admin_token metrics_token
  signing_key=$(secret)
  admin_token=$(secret)
  metrics_token=$(secret)
  local lb="http://127.0.0.1:$PORT" n replicas="" metrics=""

  for n in "${REPLICAS[@]}"; do
    local dir="$STACK_DIR/replica-$n"
    rm -rf "$dir" && mkdir -p "$dir"
    env -u RUST_LOG -u OPENAI_API_KEY \
      IMAGEGATE__SERVER__LISTEN="127.0.0.1:$((PORT + n))" \
      IMAGEGATE__SERVER__PUBLIC_URL="$lb" \
      IMAGEGATE__SERVER__SHUTDOWN_GRACE=0s \
      IMAGEGATE__LOG__FORMAT=json \
      IMAGEGATE__STORAGE__DATA_DIR="$dir" \
      IMAGEGATE__DATABASE__URL="$db_url" \
      IMAGEGATE__LIMITS__BACKEND=redis \
      IMAGEGATE__LIMITS__REDIS_URL=redis://127.0.0.1:6379/0 \
      IMAGEGATE__LIMITS__REDIS_PREFIX="$prefix" \
      IMAGEGATE__CACHE__BACKEND=redis \
      IMAGEGATE__CACHE__REDIS_URL=redis://127.0.0.1:6379/0 \
      IMAGEGATE__CACHE__REDIS_PREFIX="$prefix-cache" \
      IMAGEGATE__STORAGE__BACKEND=s3 \
      IMAGEGATE__STORAGE__S3__BUCKET="$BUCKET" \
      IMAGEGATE__STORAGE__S3__ENDPOINT="$SVC_S3_ENDPOINT" \
      IMAGEGATE__STORAGE__S3__ALLOW_HTTP=true \
      IMAGEGATE__STORAGE__S3__PREFIX="$prefix" \
      IMAGEGATE__STORAGE__S3__ACCESS_KEY_ID=stack \
      IMAGEGATE__STORAGE__S3__SECRET_ACCESS_KEY=stack \
      IMAGEGATE__IMAGES__SIGNING_KEY="$signing_key" \
      IMAGEGATE__ADMIN__TOKEN="$admin_token" \
      IMAGEGATE__METRICS__LISTEN="127.0.0.1:$((PORT + 10 + n))" \
      IMAGEGATE__METRICS__TOKEN="$metrics_token" \
      nohup "$BIN" serve --mock </dev/null >"$STACK_DIR/replica-$n.log" 2>&1 &
    echo $! >"$STACK_DIR/replica-$n.pid"
    replicas+="${replicas:+,}http://127.0.0.1:$((PORT + n))"
    metrics+="${metrics:+,}http://127.0.0.1:$((PORT + 10 + n))"
  done
  for n in "${REPLICAS[@]}"; do
    wait_http "http://127.0.0.1:$((PORT + n))/readyz" 60 ||
      die "replica $n is not ready; last lines of $STACK_DIR/replica-$n.log: $(tail -n 5 "$STACK_DIR/replica-$n.log")"
  done

  nginx_conf >"$STACK_DIR/nginx.conf"
  "$nginx_bin" -t -q -c "$STACK_DIR/nginx.conf" -p "$STACK_DIR/nginx" || die "nginx refuses $STACK_DIR/nginx.conf"
  nohup "$nginx_bin" -c "$STACK_DIR/nginx.conf" -p "$STACK_DIR/nginx" </dev/null >>"$STACK_DIR/nginx.log" 2>&1 &
  echo $! >"$STACK_DIR/nginx.pid"
  wait_http "$lb/lb-health" 20 || die "nginx does not answer on $lb; see $STACK_DIR/nginx.log"
  wait_http "$lb/readyz" 20 || die "the replicas do not answer through nginx"

  cat >"$STACK_DIR/stack.env" <<EOF
IMAGEGATE_STACK_URL=$lb
IMAGEGATE_STACK_REPLICAS=$replicas
IMAGEGATE_STACK_METRICS=$metrics
IMAGEGATE_STACK_ADMIN_TOKEN=$admin_token
IMAGEGATE_STACK_METRICS_TOKEN=$metrics_token
EOF
  log "up: load balancer $lb (replicas $replicas; metrics $metrics; logs in $STACK_DIR)"
  log "admin token and metrics token: $STACK_DIR/stack.env"
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  status) status ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Local services that tests may need: Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432,
# an S3-compatible object store (moto's server) on 127.0.0.1:${IMAGEGATE_S3_PORT:-9000}.
#
#   source .ci/services.sh; ensure_redis; ensure_postgres; ensure_s3   # from .ci/run
#   bash .ci/services.sh [redis] [postgres] [s3]                       # by hand (default: all three)
#
# Each ensure_* returns 0 once something answers on the port, starting (and, if
# missing, apt-installing) the server when nothing does. On failure it prints a
# warning and returns non-zero; it never exits the calling shell. ensure_s3 also
# creates the test bucket and leaves the endpoint in SVC_S3_ENDPOINT.

_SVC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_SVC_TMP="$_SVC_DIR/tmp"
_SVC_APT_UPDATED=""

_svc_log() { printf '[services] %s\n' "$*" >&2; }

# _svc_port_open HOST PORT: true if a TCP connection succeeds within 2 s.
_svc_port_open() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# _svc_wait_port HOST PORT SECONDS
_svc_wait_port() {
  local deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    _svc_port_open "$1" "$2" && return 0
    sleep 0.5
  done
  _svc_port_open "$1" "$2"
}

# _svc_apt_install PACKAGE...: quiet, non-interactive; output goes to .ci/tmp/apt.log.
_svc_apt_install() {
  local sudo=()
  if ! command -v apt-get >/dev/null 2>&1; then
    _svc_log "apt-get is not available; cannot install $*"
    return 1
  fi
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      _svc_log "not root and no password-less sudo; cannot install $*"
      return 1
    fi
  fi
  mkdir -p "$_SVC_TMP"
  _svc_log "installing $* with apt-get (log: $_SVC_TMP/apt.log)"
  if [[ -z $_SVC_APT_UPDATED ]]; then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$_SVC_TMP/apt.log" 2>&1 </dev/null || return 1
    _SVC_APT_UPDATED=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" >>"$_SVC_TMP/apt.log" 2>&1 </dev/null
}

ensure_redis() {
  if _svc_port_open 127.0.0.1 6379; then
    _svc_log "redis: already answering on 127.0.0.1:6379"
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    if ! _svc_apt_install redis-server; then
      _svc_log "warning: could not install redis-server"
      return 1
    fi
    # The package's own scripts may have started it.
    if _svc_wait_port 127.0.0.1 6379 3; then
      _svc_log "redis: answering on 127.0.0.1:6379 after install"
      return 0
    fi
  fi
  _svc_log "redis: starting redis-server on 127.0.0.1:6379"
  if ! redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" </dev/null >/dev/null 2>&1; then
    _svc_log "warning: redis-server failed to start"
    return 1
  fi
  if _svc_wait_port 127.0.0.1 6379 15; then
    _svc_log "redis: started"
    return 0
  fi
  _svc_log "warning: redis-server started but nothing answers on 127.0.0.1:6379"
  return 1
}

ensure_postgres() {
  if _svc_port_open 127.0.0.1 5432; then
    _svc_log "postgres: already answering on 127.0.0.1:5432"
    return 0
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ -z $(ls /etc/postgresql 2>/dev/null) ]]; then
    if ! _svc_apt_install postgresql; then
      _svc_log "warning: could not install postgresql"
      return 1
    fi
    if _svc_wait_port 127.0.0.1 5432 3; then
      _svc_log "postgres: answering on 127.0.0.1:5432 after install"
      return 0
    fi
  fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1) || true
  if [[ -z $version ]]; then
    _svc_log "warning: no PostgreSQL cluster configuration under /etc/postgresql"
    return 1
  fi
  if [[ ! -d /etc/postgresql/$version/main ]] && command -v pg_createcluster >/dev/null 2>&1; then
    _svc_log "postgres: creating cluster $version/main"
    pg_createcluster "$version" main </dev/null >/dev/null 2>&1 || true
  fi
  _svc_log "postgres: starting cluster $version/main"
  if ! pg_ctlcluster --skip-systemctl-redirect "$version" main start </dev/null >/dev/null 2>&1; then
    # "already running" also exits non-zero; the port check below decides.
    _svc_log "postgres: pg_ctlcluster start reported an error"
  fi
  if _svc_wait_port 127.0.0.1 5432 30; then
    _svc_log "postgres: started"
    return 0
  fi
  _svc_log "warning: nothing answers on 127.0.0.1:5432"
  return 1
}

# --- S3 ---------------------------------------------------------------------------------------
# moto's standalone server (https://docs.getmoto.org/en/latest/docs/server_mode.html), pinned in
# .ci/s3-requirements.txt and installed into its own venv, .ci/tmp/s3-venv, which is rebuilt only
# when that file or the interpreter changes. It keeps everything in memory: a restart empties it.
# Its pid and port are kept in .ci/tmp/s3.pid and .ci/tmp/s3.port, its output in .ci/tmp/s3.log.
SVC_S3_ENDPOINT=""

# _svc_s3_answers PORT: true if an S3 API answers an unsigned ListBuckets on 127.0.0.1:PORT:
# moto answers 200 with a ListAllMyBucketsResult, servers that check signatures (MinIO, ...) an
# S3 <Error> document (AccessDenied and the like).
_svc_s3_answers() {
  local out code
  out=$(curl -s -m 5 -w '\n%{http_code}' "http://127.0.0.1:$1/" 2>/dev/null) || return 1
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  case $code in
    200) [[ $out == *"<ListAllMyBucketsResult"* ]] ;;
    400 | 401 | 403) [[ $out == *"<Error>"*"<Code>"* ]] ;;
    *) return 1 ;;
  esac
}

# _svc_s3_our_pid: the pid in .ci/tmp/s3.pid, if that process is alive and is a moto_server.
_svc_s3_our_pid() {
  local pid
  pid=$(cat "$_SVC_TMP/s3.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q moto_server || return 1
  echo "$pid"
}

# _svc_s3_venv: make sure .ci/tmp/s3-venv has the pinned moto server.
_svc_s3_venv() {
  local venv=$_SVC_TMP/s3-venv reqs=$_SVC_DIR/s3-requirements.txt log=$_SVC_TMP/s3-venv.log stamp
  if [[ ! -f $reqs ]]; then
    _svc_log "warning: $reqs is missing"
    return 1
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    if ! _svc_apt_install python3 python3-venv python3-pip; then
      _svc_log "warning: python3 is missing and could not be installed"
      return 1
    fi
  fi
  stamp=$(
    {
      cat "$reqs"
      python3 -c 'import sys; print(sys.version, sys.executable)'
    } | sha256sum | cut -d' ' -f1
  ) || return 1
  if [[ -x $venv/bin/moto_server && -f $venv/.imagegate-stamp && $(cat "$venv/.imagegate-stamp") == "$stamp" ]] &&
    "$venv/bin/python" -c 'import moto.server' 2>/dev/null; then
    return 0
  fi
  _svc_log "s3: installing $(grep -v '^[[:space:]]*#' "$reqs" | xargs) into $venv (log: $log)"
  mkdir -p "$_SVC_TMP"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >"$log" 2>&1; then
    # Debian's python3 ships venv/ensurepip separately.
    rm -rf "$venv"
    _svc_apt_install python3-venv || true
    if ! python3 -m venv "$venv" >>"$log" 2>&1; then
      _svc_log "warning: could not create $venv"
      return 1
    fi
  fi
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -r "$reqs" >>"$log" 2>&1; then
    _svc_log "warning: pip could not install $reqs; last lines of $log:"
    tail -n 5 "$log" >&2
    rm -rf "$venv"
    return 1
  fi
  echo "$stamp" >"$venv/.imagegate-stamp"
}

# ensure_s3_bucket ENDPOINT BUCKET: create BUCKET with an unsigned PUT (moto takes it); one that
# already exists is fine.
ensure_s3_bucket() {
  local endpoint=${1%/} bucket=$2 out code
  out=$(curl -s -m 10 -X PUT -w '\n%{http_code}' "$endpoint/$bucket" 2>/dev/null) || out=$'\n000'
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  if [[ $code == 200 ]] || [[ $code == 409 && $out == *"<Code>BucketAlready"* ]]; then
    _svc_log "s3: bucket $bucket ready at $endpoint"
    return 0
  fi
  _svc_log "warning: could not create bucket $bucket at $endpoint (HTTP $code): ${out:0:300}"
  return 1
}

# ensure_s3: an S3-compatible server on 127.0.0.1 with the bucket ${IMAGEGATE_TEST_S3_BUCKET:-imagegate-test}.
# Reuses whatever speaks S3 on ${IMAGEGATE_S3_PORT:-9000}, or the moto server an earlier call started
# on one of the next 100 ports because that one was taken; otherwise starts moto, on the next free
# port if that one is taken by something that is not S3. Sets SVC_S3_ENDPOINT=http://127.0.0.1:PORT.
ensure_s3() {
  local port=${IMAGEGATE_S3_PORT:-9000} bucket=${IMAGEGATE_TEST_S3_BUCKET:-imagegate-test}
  local pid="" old_port="" started deadline try
  local venv=$_SVC_TMP/s3-venv
  SVC_S3_ENDPOINT=""
  if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    _svc_log "warning: IMAGEGATE_S3_PORT=$port is not a TCP port"
    return 1
  fi
  if ! command -v curl >/dev/null 2>&1 && ! _svc_apt_install curl; then
    _svc_log "warning: curl is missing and could not be installed"
    return 1
  fi
  old_port=$(cat "$_SVC_TMP/s3.port" 2>/dev/null) || old_port=""
  if _svc_s3_answers "$port"; then
    _svc_log "s3: already answering on 127.0.0.1:$port"
  elif pid=$(_svc_s3_our_pid) && [[ $old_port =~ ^[0-9]+$ ]] && ((old_port > port && old_port <= port + 100)) &&
    _svc_s3_answers "$old_port"; then
    port=$old_port
    _svc_log "s3: moto_server (pid $pid) already answering on 127.0.0.1:$port"
  else
    if pid=$(_svc_s3_our_pid); then
      _svc_log "s3: stopping the earlier moto_server (pid $pid, port ${old_port:-?}), which does not answer here"
      kill "$pid" 2>/dev/null || true
      sleep 1
      kill -9 "$pid" 2>/dev/null || true
    fi
    if _svc_port_open 127.0.0.1 "$port"; then
      try=$port
      while _svc_port_open 127.0.0.1 "$try"; do
        try=$((try + 1))
        if ((try > port + 100 || try > 65535)); then
          _svc_log "warning: no free port in 127.0.0.1:$port-$try for the S3 server"
          return 1
        fi
      done
      _svc_log "s3: 127.0.0.1:$port is taken by something that does not speak S3; using $try"
      port=$try
    fi
    _svc_s3_venv || return 1
    _svc_log "s3: starting moto_server on 127.0.0.1:$port (log: $_SVC_TMP/s3.log)"
    local detach=()
    command -v setsid >/dev/null 2>&1 && detach=(setsid)
    started=$EPOCHREALTIME
    printf -- '--- %s: moto_server -H 127.0.0.1 -p %s\n' "$(date -u '+%F %T')" "$port" >>"$_SVC_TMP/s3.log"
    "${detach[@]}" nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" </dev/null >>"$_SVC_TMP/s3.log" 2>&1 &
    pid=$!
    echo "$pid" >"$_SVC_TMP/s3.pid"
    echo "$port" >"$_SVC_TMP/s3.port"
    deadline=$((SECONDS + 60))
    until _svc_s3_answers "$port"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        _svc_log "warning: moto_server exited; last lines of $_SVC_TMP/s3.log:"
        tail -n 5 "$_SVC_TMP/s3.log" >&2
        return 1
      fi
      if ((SECONDS >= deadline)); then
        _svc_log "warning: moto_server (pid $pid) started but does not answer on 127.0.0.1:$port; stopping it"
        kill "$pid" 2>/dev/null || true
        return 1
      fi
      sleep 0.2
    done
    _svc_log "s3: started (pid $pid) in $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
  fi
  ensure_s3_bucket "http://127.0.0.1:$port" "$bucket" || return 1
  SVC_S3_ENDPOINT=http://127.0.0.1:$port
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  rc=0
  services=("$@")
  ((${#services[@]})) || services=(redis postgres s3)
  for service in "${services[@]}"; do
    case $service in
      redis) ensure_redis || rc=1 ;;
      postgres) ensure_postgres || rc=1 ;;
      s3) if ensure_s3; then echo "$SVC_S3_ENDPOINT"; else rc=1; fi ;;
      *)
        _svc_log "unknown service: $service (known: redis, postgres, s3)"
        rc=2
        ;;
    esac
  done
  exit "$rc"
fi

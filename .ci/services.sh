#!/usr/bin/env bash
# Local services that tests may need: Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432.
#
#   source .ci/services.sh; ensure_redis; ensure_postgres   # from .ci/run
#   bash .ci/services.sh [redis] [postgres]                 # by hand (default: both)
#
# Each ensure_* returns 0 once something answers on the port, starting (and, if
# missing, apt-installing) the server when nothing does. On failure it prints a
# warning and returns non-zero; it never exits the calling shell.

_SVC_TMP="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tmp"
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

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  rc=0
  services=("$@")
  ((${#services[@]})) || services=(redis postgres)
  for service in "${services[@]}"; do
    case $service in
      redis) ensure_redis || rc=1 ;;
      postgres) ensure_postgres || rc=1 ;;
      *)
        _svc_log "unknown service: $service (known: redis, postgres)"
        rc=2
        ;;
    esac
  done
  exit "$rc"
fi

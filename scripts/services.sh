# shellcheck shell=bash
# PostgreSQL and Redis for the scale-out tests (tests/common/services.rs) and scripts/cluster.
# Source this file, then:
#
#   trap relay_services_down EXIT
#   relay_services_up || exit 1
#
# relay_services_up exports RELAY_TEST_DATABASE_URL and RELAY_TEST_REDIS_URL. One that is already
# set is used as it is (CI points them at the machine's services). One that is not set gets a
# throwaway instance on a free loopback port: PostgreSQL initdb'd into a temporary directory
# (trust auth, superuser `postgres`, fsync off; run as the `postgres` user, or a `relaytest`
# system user created for it, when we are root, since PostgreSQL refuses to run as root), and
# redis-server without persistence. Missing binaries are installed with apt-get when root;
# anyone else is told the command to run, and it fails (returns 1).
#
# relay_services_down stops only what relay_services_up started, by pid, and removes its
# temporary directories. It may be called more than once.

_RELAY_PG_PID=""      # the postmaster
_RELAY_PG_WRAPPER=""  # our child that runs it (runuser, or the postmaster itself)
_RELAY_PG_DIR=""
_RELAY_REDIS_PID=""
_RELAY_REDIS_DIR=""
_RELAY_AS=()          # the command prefix that runs PostgreSQL as a user other than root
_RELAY_PG_OWNER=""    # that user

_relay_say() { echo "services.sh: $*" >&2; }

# A free TCP port on 127.0.0.1 (the kernel's pick for port 0; random probing without python3).
_relay_free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local port _
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  _relay_say "found no free port (tried 200)"
  return 1
}

# Whether pid is a live process (a zombie is not).
_relay_alive() {
  local stat
  kill -0 "$1" 2>/dev/null || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

# Sends signal $2 to pid $1 and waits (at most $3 seconds, default 15) for it to go; then
# SIGKILL. Reaps it when it is our child.
_relay_stop_pid() {
  local pid=$1 sig=$2 deadline=$((SECONDS + ${3:-15}))
  kill -"$sig" "$pid" 2>/dev/null || true
  while _relay_alive "$pid"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      _relay_say "pid $pid did not exit after SIG$sig; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  wait "$pid" 2>/dev/null || true
}

# Removes a directory this file made (nothing else, whatever the variable holds).
_relay_rm_dir() {
  case $1 in
    */relay-pg.* | */relay-redis.*) rm -rf -- "$1" ;;
  esac
}

# The URL with any password replaced by ***, for printing.
_relay_redact() {
  local url=$1 scheme rest auth path userinfo
  case $url in
    *://*) ;;
    *) printf '%s' "$url"; return ;;
  esac
  scheme=${url%%://*}
  rest=${url#*://}
  auth=${rest%%[/?#]*}
  path=${rest:${#auth}}
  case $auth in
    *@*)
      userinfo=${auth%@*}
      auth=${auth##*@}
      case $userinfo in *:*) userinfo="${userinfo%%:*}:***" ;; esac
      auth="$userinfo@$auth"
      ;;
  esac
  path=$(printf '%s' "$path" | sed -E 's/(password=)[^&#]*/\1***/g')
  printf '%s://%s%s' "$scheme" "$auth" "$path"
}

# Sets _RELAY_INITDB, _RELAY_POSTGRES and _RELAY_PG_ISREADY (may stay empty) from PATH, then
# the newest /usr/lib/postgresql/*/bin. Returns 1 when initdb or postgres is missing.
_relay_find_pg() {
  local dir
  _RELAY_INITDB="" _RELAY_POSTGRES="" _RELAY_PG_ISREADY=""
  if command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
    _RELAY_INITDB=$(command -v initdb)
    _RELAY_POSTGRES=$(command -v postgres)
  else
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
      if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
        _RELAY_INITDB=$dir/initdb
        _RELAY_POSTGRES=$dir/postgres
        break
      fi
    done
  fi
  [ -n "$_RELAY_INITDB" ] || return 1
  dir=$(dirname "$_RELAY_POSTGRES")
  if [ -x "$dir/pg_isready" ]; then
    _RELAY_PG_ISREADY=$dir/pg_isready
  elif command -v pg_isready >/dev/null 2>&1; then
    _RELAY_PG_ISREADY=$(command -v pg_isready)
  fi
  return 0
}

# Installs Debian packages when root (with apt-get); otherwise says how and returns 1.
_relay_install() {
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "services.sh: installing $*: apt-get install -y -qq $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || return 1
    return 0
  fi
  _relay_say "$* missing: the scale-out tests need PostgreSQL and Redis."
  _relay_say "Install them, then run again:"
  echo "  sudo apt-get install -y $*" >&2
  _relay_say "(or point RELAY_TEST_DATABASE_URL and RELAY_TEST_REDIS_URL at running servers)"
  return 1
}

# Sets _RELAY_AS: nothing when we are not root; else runuser (or su) to the `postgres` user, or
# to a `relaytest` system user, created when missing.
_relay_pg_user() {
  local user
  _RELAY_AS=()
  [ "$(id -u)" -eq 0 ] || return 0
  if id -u postgres >/dev/null 2>&1; then
    user=postgres
  else
    user=relaytest
    if ! id -u "$user" >/dev/null 2>&1; then
      useradd -r -M -d /nonexistent -s /usr/sbin/nologin "$user" || {
        _relay_say "could not create the system user $user to run PostgreSQL (it refuses root)"
        return 1
      }
    fi
  fi
  if command -v runuser >/dev/null 2>&1; then
    _RELAY_AS=(runuser -u "$user" --)
  else
    # shellcheck disable=SC2016 # $0 and $@ are for the user's sh, not for us
    _RELAY_AS=(su -s /bin/sh -c 'exec "$0" "$@"' "$user")
  fi
  _RELAY_PG_OWNER=$user
}

_relay_pg_ready() { # port
  if [ -n "$_RELAY_PG_ISREADY" ]; then
    "$_RELAY_PG_ISREADY" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -t 2 >/dev/null 2>&1
  else
    grep -q "database system is ready to accept connections" "$_RELAY_PG_DIR/postgres.log" 2>/dev/null
  fi
}

_relay_pg_up() {
  local dir port attempt deadline
  _relay_pg_user || return 1
  # Under /tmp, not $TMPDIR: the user PostgreSQL runs as must be able to reach it.
  dir=$(mktemp -d /tmp/relay-pg.XXXXXX) || return 1
  _RELAY_PG_DIR=$dir
  mkdir -m 700 "$dir/data" && mkdir "$dir/sock" || return 1
  if [ "${#_RELAY_AS[@]}" -gt 0 ]; then
    chown -R "$_RELAY_PG_OWNER" "$dir" || return 1
  fi
  if ! (cd / && exec "${_RELAY_AS[@]}" "$_RELAY_INITDB" -D "$dir/data" -U postgres -A trust \
    -E UTF8 --locale=C --no-sync) </dev/null >"$dir/initdb.log" 2>&1; then
    _relay_say "initdb failed:"
    cat "$dir/initdb.log" >&2
    return 1
  fi
  for attempt in 1 2 3; do
    port=$(_relay_free_port) || return 1
    (cd / && exec "${_RELAY_AS[@]}" "$_RELAY_POSTGRES" -D "$dir/data" -p "$port" -k "$dir/sock" \
      -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300) \
      </dev/null >"$dir/postgres.log" 2>&1 &
    _RELAY_PG_WRAPPER=$!
    deadline=$((SECONDS + 60))
    while _relay_alive "$_RELAY_PG_WRAPPER"; do
      if _relay_pg_ready "$port"; then
        _RELAY_PG_PID=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null) || true
        [ -n "$_RELAY_PG_PID" ] || _RELAY_PG_PID=$_RELAY_PG_WRAPPER
        export RELAY_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
        return 0
      fi
      if [ "$SECONDS" -ge "$deadline" ]; then
        _relay_say "PostgreSQL did not accept connections on port $port within 60 s:"
        cat "$dir/postgres.log" >&2
        return 1
      fi
      sleep 0.1
    done
    # It exited: most likely another process took the port in the meantime. Try another.
    wait "$_RELAY_PG_WRAPPER" 2>/dev/null || true
    _RELAY_PG_WRAPPER=""
    _relay_say "PostgreSQL exited at start (attempt $attempt, port $port):"
    cat "$dir/postgres.log" >&2
  done
  return 1
}

_relay_redis_ping() { # port
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
    return
  fi
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 line <&3 || exit 1
    [ "${line%$'\r'}" = "+PONG" ]
  ) 2>/dev/null
}

_relay_redis_up() {
  local dir port attempt deadline
  dir=$(mktemp -d "${TMPDIR:-/tmp}/relay-redis.XXXXXX") || return 1
  _RELAY_REDIS_DIR=$dir
  for attempt in 1 2 3; do
    port=$(_relay_free_port) || return 1
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
      --dir "$dir" </dev/null >"$dir/redis.log" 2>&1 &
    _RELAY_REDIS_PID=$!
    deadline=$((SECONDS + 30))
    while _relay_alive "$_RELAY_REDIS_PID"; do
      if _relay_redis_ping "$port"; then
        export RELAY_TEST_REDIS_URL="redis://127.0.0.1:$port"
        return 0
      fi
      if [ "$SECONDS" -ge "$deadline" ]; then
        _relay_say "redis-server did not answer PING on port $port within 30 s:"
        cat "$dir/redis.log" >&2
        return 1
      fi
      sleep 0.05
    done
    wait "$_RELAY_REDIS_PID" 2>/dev/null || true
    _RELAY_REDIS_PID=""
    _relay_say "redis-server exited at start (attempt $attempt, port $port):"
    cat "$dir/redis.log" >&2
  done
  return 1
}

relay_services_up() {
  local pg_note=given redis_note=given missing=()
  if [ -z "${RELAY_TEST_DATABASE_URL:-}" ] && ! _relay_find_pg; then
    missing+=(postgresql)
  fi
  if [ -z "${RELAY_TEST_REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
    missing+=(redis-server)
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    _relay_install "${missing[@]}" || return 1
    if [ -z "${RELAY_TEST_DATABASE_URL:-}" ] && ! _relay_find_pg; then
      _relay_say "installed postgresql, but found no initdb and postgres (PATH, /usr/lib/postgresql/*/bin)"
      return 1
    fi
    if [ -z "${RELAY_TEST_REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
      _relay_say "installed redis-server, but it is not on PATH"
      return 1
    fi
  fi
  if [ -z "${RELAY_TEST_DATABASE_URL:-}" ]; then
    _relay_pg_up || return 1
    pg_note=throwaway
  fi
  if [ -z "${RELAY_TEST_REDIS_URL:-}" ]; then
    _relay_redis_up || return 1
    redis_note=throwaway
  fi
  export RELAY_TEST_DATABASE_URL RELAY_TEST_REDIS_URL
  echo "services: PostgreSQL $(_relay_redact "$RELAY_TEST_DATABASE_URL") ($pg_note)," \
    "Redis $(_relay_redact "$RELAY_TEST_REDIS_URL") ($redis_note)"
}

relay_services_down() {
  if [ -n "$_RELAY_PG_PID" ]; then
    # SIGINT: PostgreSQL's fast shutdown (clients are disconnected, no waiting for them).
    _relay_stop_pid "$_RELAY_PG_PID" INT
    _RELAY_PG_PID=""
  fi
  if [ -n "$_RELAY_PG_WRAPPER" ]; then
    _relay_stop_pid "$_RELAY_PG_WRAPPER" INT 5
    _RELAY_PG_WRAPPER=""
    unset RELAY_TEST_DATABASE_URL
  fi
  if [ -n "$_RELAY_REDIS_PID" ]; then
    _relay_stop_pid "$_RELAY_REDIS_PID" TERM
    _RELAY_REDIS_PID=""
    unset RELAY_TEST_REDIS_URL
  fi
  if [ -n "$_RELAY_PG_DIR" ]; then
    _relay_rm_dir "$_RELAY_PG_DIR"
    _RELAY_PG_DIR=""
  fi
  if [ -n "$_RELAY_REDIS_DIR" ]; then
    _relay_rm_dir "$_RELAY_REDIS_DIR"
    _RELAY_REDIS_DIR=""
  fi
  return 0
}

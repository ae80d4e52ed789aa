#!/usr/bin/env bash
# Benchmark: pingora-vhost beside nginx and HAProxy, same origin, one worker each.
#
#   bench/run.sh [--only-baselines | --only nginx,haproxy,pingora-vhost] [--skip-build] [--help]
#
#   --only-baselines  run nginx and HAProxy only (no cargo build, no pingora-vhost)
#   --only LIST       run only the listed proxies (comma-separated); ratios need all three
#   --skip-build      do not run `cargo build --release`; use the existing binary
#
#   Access-log variants (not in the default list): nginx-log (nginx with
#   `access_log ... combined buffer=64k`) and pingora-vhost-log (`[access_log]` on, to a
#   file). BENCH_ACCESS_LOG=1 adds both to the run, with their ratios to each other and to
#   pingora-vhost without a log; or name them in --only.
#
# See bench/README.md for what is measured and how. Run as root on Debian (it installs
# missing packages with apt-get). Everything it starts is killed on exit and its temp
# dir removed.
#
# Environment overrides:
#   BENCH_DURATION=8       measured seconds per run
#   BENCH_WARMUP=2         warm-up seconds before the runs of each proxy and protocol
#   BENCH_RUNS=5           rounds; each measures every proxy and protocol once. Reported: the
#                          best run (most req/s) of each, and the median of per-round ratios
#   BENCH_CONNECTIONS=50   wrk connections (wrk always uses 1 thread)
#   BENCH_IDLE_CONNS=10000 idle keep-alive connections held to measure memory per connection
#                          (bench/idle_conns.py; 0 skips that part)
#   BENCH_IDLE_ORDER="http https"  order of the idle measurements (each on a fresh process)
#   BENCH_PORT_BASE=18400  first loopback port tried; busy ports are skipped
#   BENCH_CPU_LOAD / BENCH_CPU_PROXY   CPUs for wrk+origin / for the proxy
#                          (default: first and second CPU of this process's affinity)
#   BENCH_PV_BIN=path      pingora-vhost binary (default <target dir>/release/pingora-vhost)
#   BENCH_RESULTS=path     markdown output (default bench/results/latest.md)
#   BENCH_KEEP_TMP=1       keep the temp dir (configs, logs, raw wrk output) for debugging
#   BENCH_ACCESS_LOG=1     also run nginx-log and pingora-vhost-log (see above)
#   BENCH_EDGE=1           also run the production-edge variants (issue #14):
#                          nginx-tlsup / pingora-vhost-tlsup: TLS to the origin with keep-alive
#                          (nginx: proxy_pass https:// + proxy_ssl_session_reuse on + an upstream
#                          keepalive pool); pingora-vhost-front / pingora-vhost-pp: behind an
#                          HAProxy in TCP mode (on the load CPU), without and with PROXY
#                          protocol v2 (`send-proxy-v2`; [proxy.proxy_protocol] trusted)
#   BENCH_PV_LOG_FORMAT=json  format of pingora-vhost-log's access log (json | combined)

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"

DURATION="${BENCH_DURATION:-8}"
WARMUP="${BENCH_WARMUP:-2}"
RUNS="${BENCH_RUNS:-5}"
CONNECTIONS="${BENCH_CONNECTIONS:-50}"
IDLE_CONNS="${BENCH_IDLE_CONNS:-10000}"
PORT_BASE="${BENCH_PORT_BASE:-18400}"
RESULTS_MD="${BENCH_RESULTS:-$SCRIPT_DIR/results/latest.md}"
HOST_HEADER="bench.local"

PROXIES=(nginx haproxy pingora-vhost)
[ "${BENCH_ACCESS_LOG:-0}" = 1 ] && PROXIES+=(nginx-log pingora-vhost-log)
[ "${BENCH_EDGE:-0}" = 1 ] && PROXIES+=(nginx-tlsup pingora-vhost-tlsup pingora-vhost-front pingora-vhost-pp)
PV_LOG_FORMAT="${BENCH_PV_LOG_FORMAT:-json}"
SKIP_BUILD=0

usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --only-baselines) PROXIES=(nginx haproxy) ;;
        --only)
            [ $# -ge 2 ] || { echo "run.sh: --only needs a list" >&2; exit 2; }
            IFS=, read -r -a PROXIES <<< "$2"; shift
            for p in "${PROXIES[@]}"; do
                case "$p" in nginx|haproxy|pingora-vhost|nginx-log|pingora-vhost-log|nginx-tlsup|pingora-vhost-tlsup|pingora-vhost-front|pingora-vhost-pp) ;;
                    *) echo "run.sh: --only: unknown proxy '$p' (nginx, haproxy, pingora-vhost, nginx-log, pingora-vhost-log, nginx-tlsup, pingora-vhost-tlsup, pingora-vhost-front, pingora-vhost-pp)" >&2; exit 2 ;;
                esac
            done ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

for v in DURATION WARMUP RUNS CONNECTIONS PORT_BASE; do
    case "${!v}" in
        ''|*[!0-9]*) echo "run.sh: BENCH_$v must be a non-negative integer, got '${!v}'" >&2; exit 2 ;;
    esac
done
has_proxy() { local p; for p in "${PROXIES[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
RUN_PV=0
for p in pingora-vhost pingora-vhost-log pingora-vhost-tlsup pingora-vhost-front pingora-vhost-pp; do
    has_proxy "$p" && RUN_PV=1
done
ALL3=0; has_proxy nginx && has_proxy haproxy && [ "$RUN_PV" -eq 1 ] && ALL3=1
BASE2=0; has_proxy nginx && has_proxy haproxy && BASE2=1

[ "$DURATION" -ge 1 ] || { echo "run.sh: BENCH_DURATION must be >= 1" >&2; exit 2; }
[ "$RUNS" -ge 1 ] || { echo "run.sh: BENCH_RUNS must be >= 1" >&2; exit 2; }
[ "$CONNECTIONS" -ge 1 ] || { echo "run.sh: BENCH_CONNECTIONS must be >= 1" >&2; exit 2; }

log()  { printf '[bench] %s\n' "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "run as root (it installs packages with apt-get and binds loopback ports)"
fi

# ---------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

apt_install() {
    # apt_install PKG... ; does not let package install scripts start system services
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    log "apt-get install $*"
    local rc=0
    apt-get install -y -qq --no-install-recommends "$@" >&2 || rc=$?
    if [ "$made_policy" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    return "$rc"
}

need_cmd() {
    # need_cmd CMD PKG [FALLBACK_PKG]
    local cmd="$1" pkg="$2" alt="${3:-}"
    command -v "$cmd" >/dev/null 2>&1 && return 0
    apt_install "$pkg" || { [ -n "$alt" ] && apt_install "$alt"; } || true
    command -v "$cmd" >/dev/null 2>&1 || die "cannot install '$cmd' (package $pkg${alt:+ or $alt})"
}

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script targets Debian"
need_cmd nginx nginx nginx-light
need_cmd haproxy haproxy
need_cmd wrk wrk
need_cmd openssl openssl
need_cmd curl curl
need_cmd taskset util-linux
need_cmd timeout coreutils
need_cmd getconf libc-bin
need_cmd awk mawk

CLK_TCK="$(getconf CLK_TCK)"

# Enough file descriptors for CONNECTIONS client + upstream connections in each proxy, and
# the idle connections of the memory measurement.
MAXCONN=$(( CONNECTIONS * 2 + IDLE_CONNS + 1024 ))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((MAXCONN * 2 + 64)) ]; then
    die "open-file limit $(ulimit -n) too low for $CONNECTIONS connections"
fi

# ---------------------------------------------------------------------------------------
# Build pingora-vhost
# ---------------------------------------------------------------------------------------
PV_BIN="${BENCH_PV_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/pingora-vhost}"
if [ "$RUN_PV" -eq 1 ]; then
    if [ "$SKIP_BUILD" -eq 0 ]; then
        if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        fi
        command -v cargo >/dev/null 2>&1 || die "cargo not found (install a Rust toolchain with rustup), or use --only-baselines"
        need_cmd cmake cmake            # pingora-core builds zlib-ng
        need_cmd cc gcc
        need_cmd make make
        log "cargo build --release (in $REPO_DIR)"
        (cd "$REPO_DIR" && cargo build --release) >&2 || die "cargo build --release failed"
    fi
    [ -x "$PV_BIN" ] || die "pingora-vhost binary not found at $PV_BIN"
fi

# ---------------------------------------------------------------------------------------
# CPU pinning: wrk + origin on one CPU, the proxy under test alone on another.
# ---------------------------------------------------------------------------------------
expand_cpulist() {
    # "0-2,5" -> "0 1 2 5"
    local IFS=, part out=""
    for part in $1; do
        if [[ "$part" == *-* ]]; then
            out="$out $(seq "${part%-*}" "${part#*-}" | tr '\n' ' ')"
        else
            out="$out $part"
        fi
    done
    echo $out
}
ALLOWED_CPUS=($(expand_cpulist "$(taskset -pc $$ | sed 's/.*: *//')"))
PIN=0
if [ "${#ALLOWED_CPUS[@]}" -ge 2 ]; then
    CPU_LOAD="${BENCH_CPU_LOAD:-${ALLOWED_CPUS[0]}}"
    CPU_PROXY="${BENCH_CPU_PROXY:-${ALLOWED_CPUS[1]}}"
    PIN=1
else
    log "fewer than 2 CPUs available: running without CPU pinning"
    CPU_LOAD="-"; CPU_PROXY="-"
fi
# Command prefixes (arrays, so `exec` and `$!` reach the real program, not a shell function).
PIN_LOAD=(); PIN_PROXY=()
if [ "$PIN" -eq 1 ]; then PIN_LOAD=(taskset -c "$CPU_LOAD"); PIN_PROXY=(taskset -c "$CPU_PROXY"); fi

# ---------------------------------------------------------------------------------------
# Temp dir, process bookkeeping, cleanup
# ---------------------------------------------------------------------------------------
TMP="$(mktemp -d /tmp/pv-bench.XXXXXX)"
chmod 755 "$TMP"
STARTED_PIDS=()

# Print PID and all its descendants (from /proc; no procps needed).
proc_tree() {
    local root="$1"
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$root" '
        { pid = $1; line = $0; sub(/^.*\) /, "", line); split(line, f, " "); parent[pid] = f[2] }
        END {
            n = 1; q[1] = root; seen[root] = 1; out = root
            for (i = 1; i <= n; i++)
                for (p in parent)
                    if (parent[p] == q[i] && !(p in seen)) { seen[p] = 1; q[++n] = p; out = out " " p }
            print out
        }'
}

# Sum utime+stime (clock ticks) of PID and all its descendants. Per-process stat already
# includes all threads of that process.
tree_ticks() {
    local root="$1"
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$root" '
        { pid = $1; line = $0; sub(/^.*\) /, "", line); split(line, f, " ")
          parent[pid] = f[2]; ticks[pid] = f[12] + f[13] }
        END {
            if (!(root in ticks)) { print -1; exit }
            n = 1; q[1] = root; seen[root] = 1; sum = ticks[root]
            for (i = 1; i <= n; i++)
                for (p in parent)
                    if (parent[p] == q[i] && !(p in seen)) { seen[p] = 1; q[++n] = p; sum += ticks[p] }
            print sum
        }'
}

# Busy clock ticks of the whole machine (all CPUs; /proc/stat is not per container):
# user + nice + system + steal. irq/softirq are left out: loopback traffic of the benchmark
# itself lands there.
machine_busy_ticks() {
    awk 'NR == 1 { print $2 + $3 + $4 + $9; exit }' /proc/stat
}
# CPU ticks of this shell's reaped children (wrk, via timeout/taskset, ends up here).
children_ticks() {
    local line
    line="$(cat /proc/$$/stat)"; line="${line##*) }"
    awk -v l="$line" 'BEGIN { split(l, f, " "); print f[14] + f[15] }'
}
NCPU_MACHINE="$(grep -c '^cpu[0-9]' /proc/stat)"

kill_tree() {
    local root="$1" pids p i
    [ -d "/proc/$root" ] || return 0
    pids="$(proc_tree "$root")"
    kill -TERM "$root" 2>/dev/null || true
    for i in $(seq 1 30); do
        [ -d "/proc/$root" ] || break
        # reap if it is our child
        sleep 0.1
    done
    for p in $pids; do
        [ -d "/proc/$p" ] && kill -KILL "$p" 2>/dev/null || true
    done
    wait "$root" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    set +e   # never stop half-way through the cleanup
    local i
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        kill_tree "${STARTED_PIDS[$i]}"
    done
    if [ "${BENCH_KEEP_TMP:-0}" = "1" ]; then
        log "kept temp dir $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
set -E
trap 'log "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() {
    local pid="$1" i
    for i in "${!STARTED_PIDS[@]}"; do
        [ "${STARTED_PIDS[$i]}" = "$pid" ] && unset 'STARTED_PIDS[i]'
    done
    STARTED_PIDS=("${STARTED_PIDS[@]}")
}

# ---------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------
NEXT_PORT="$PORT_BASE"
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# take_port VAR: next port from NEXT_PORT with no TCP listener on 127.0.0.1
take_port() {
    while port_busy "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    [ "$NEXT_PORT" -le 65535 ] || die "no free port at or above $PORT_BASE"
    printf -v "$1" '%s' "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT + 1))
}

take_port ORIGIN_PORT
take_port NGINX_HTTP;  take_port NGINX_HTTPS
take_port HAPROXY_HTTP; take_port HAPROXY_HTTPS
take_port PV_HTTP; take_port PV_HTTPS; take_port PV_API; take_port PV_RPC; take_port PV_GOSSIP
take_port NGINXL_HTTP;  take_port NGINXL_HTTPS
take_port PVL_HTTP; take_port PVL_HTTPS; take_port PVL_API; take_port PVL_RPC; take_port PVL_GOSSIP
take_port ORIGIN_TLS_PORT
take_port NGINXT_HTTP; take_port NGINXT_HTTPS
take_port PVT_HTTP; take_port PVT_HTTPS; take_port PVT_API; take_port PVT_RPC; take_port PVT_GOSSIP
take_port PVF_HTTP; take_port PVF_HTTPS; take_port PVF_API; take_port PVF_RPC; take_port PVF_GOSSIP
take_port PVF_FRONT_HTTP; take_port PVF_FRONT_HTTPS
take_port PVP_HTTP; take_port PVP_HTTPS; take_port PVP_API; take_port PVP_RPC; take_port PVP_GOSSIP
take_port PVP_FRONT_HTTP; take_port PVP_FRONT_HTTPS

wait_port() {
    # wait_port PORT PID NAME [TIMEOUT_S]
    local port="$1" pid="$2" name="$3" t="${4:-30}" i
    for i in $(seq 1 $((t * 10))); do
        port_busy "$port" && return 0
        [ -d "/proc/$pid" ] || { show_log "$name"; die "$name exited before listening on $port"; }
        sleep 0.1
    done
    show_log "$name"; die "$name did not listen on 127.0.0.1:$port within ${t}s"
}

show_log() {
    local f="$TMP/$1.log"
    [ -f "$f" ] && { log "--- last lines of $f ---"; tail -n 30 "$f" >&2; }
    return 0
}

# wait_http NAME PID TIMEOUT_S EXPECT_BODY curl-args...  -> waits for a 200 (and body if given)
wait_http() {
    local name="$1" pid="$2" t="$3" body="$4"; shift 4
    local i out code
    for i in $(seq 1 $((t * 5))); do
        out="$(curl -sk --max-time 2 -o "$TMP/probe.body" -w '%{http_code}' "$@" 2>/dev/null || true)"
        if [ "$out" = "200" ]; then
            if [ -z "$body" ] || [ "$(cat "$TMP/probe.body")" = "$body" ]; then return 0; fi
        fi
        code="$out"
        [ -d "/proc/$pid" ] || { show_log "$name"; die "$name exited while waiting for $*"; }
        sleep 0.2
    done
    show_log "$name"
    die "$name: no 200 from curl $* within ${t}s (last status: ${code:-none})"
}

# ---------------------------------------------------------------------------------------
# Certificate (shared by all three proxies)
# ---------------------------------------------------------------------------------------
CERT="$TMP/cert.pem"; KEY="$TMP/key.pem"; COMBINED="$TMP/combined.pem"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$KEY" -out "$CERT" -days 2 -subj "/CN=$HOST_HEADER" \
    -addext "subjectAltName=DNS:$HOST_HEADER,DNS:localhost,IP:127.0.0.1" >/dev/null 2>&1 \
    || die "openssl could not make the self-signed certificate"
cat "$CERT" "$KEY" > "$COMBINED"
chmod 644 "$CERT" "$KEY" "$COMBINED"

# ---------------------------------------------------------------------------------------
# Origin: its own nginx, 1 worker, `return 200 "ok\n"`, keep-alive.
# ---------------------------------------------------------------------------------------
nginx_common() {
    # nginx_common DIR -> top-level + temp paths so nothing outside DIR is touched
    local d="$1"
    cat <<EOF
worker_processes 1;
daemon off;
master_process on;
user root;
pid $d/nginx.pid;
error_log $d/error.log warn;
worker_rlimit_nofile $((MAXCONN * 2 + 64));
events { worker_connections $MAXCONN; }
EOF
}
nginx_temp_paths() {
    local d="$1"
    cat <<EOF
    client_body_temp_path $d/client_body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
EOF
}

start_origin() {
    local d="$TMP/origin"; mkdir -p "$d"
    {
        nginx_common "$d"
        echo "http {"
        nginx_temp_paths "$d"
        cat <<EOF
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$ORIGIN_PORT backlog=4096;
        # For the TLS-to-backend variants (BENCH_EDGE): the same answer over TLS.
        listen 127.0.0.1:$ORIGIN_TLS_PORT ssl backlog=4096;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
    } > "$d/nginx.conf"
    nginx -t -q -p "$d" -c "$d/nginx.conf" >"$TMP/origin.log" 2>&1 || { show_log origin; die "origin nginx config invalid"; }
    "${PIN_LOAD[@]}" nginx -p "$d" -c "$d/nginx.conf" >>"$TMP/origin.log" 2>&1 &
    ORIGIN_PID=$!
    STARTED_PIDS+=("$ORIGIN_PID")
    wait_port "$ORIGIN_PORT" "$ORIGIN_PID" origin
    wait_http origin "$ORIGIN_PID" 10 "ok" "http://127.0.0.1:$ORIGIN_PORT/"
    log "origin nginx on 127.0.0.1:$ORIGIN_PORT (pid $ORIGIN_PID)"
}

# ---------------------------------------------------------------------------------------
# Proxies. Each start_* sets PROXY_PID, PROXY_HTTP, PROXY_HTTPS.
# ---------------------------------------------------------------------------------------
start_nginx() {
    nginx_variant nginx "$NGINX_HTTP" "$NGINX_HTTPS" "access_log off;"
}

# nginx with TLS to the origin: sessions reused, connections kept in the upstream pool.
start_nginx_tlsup() {
    nginx_variant nginx-tlsup "$NGINXT_HTTP" "$NGINXT_HTTPS" "access_log off;" \
        "127.0.0.1:$ORIGIN_TLS_PORT" "https" "proxy_ssl_session_reuse on; proxy_ssl_server_name on; proxy_ssl_name $HOST_HEADER;"
}

# The same nginx with its access log on, buffered as production setups do.
start_nginx_log() {
    nginx_variant nginx-log "$NGINXL_HTTP" "$NGINXL_HTTPS" \
        "access_log $TMP/nginx-log/access.log combined buffer=64k;"
}

# nginx_variant NAME HTTP_PORT HTTPS_PORT ACCESS_LOG_DIRECTIVE [UPSTREAM SCHEME EXTRA]
nginx_variant() {
    local name="$1" http="$2" https="$3" access_log="$4"
    local upstream="${5:-127.0.0.1:$ORIGIN_PORT}" scheme="${6:-http}" extra="${7:-}"
    local d="$TMP/$name"; mkdir -p "$d"
    {
        nginx_common "$d"
        echo "http {"
        nginx_temp_paths "$d"
        cat <<EOF
    $access_log
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    upstream origin {
        server $upstream;
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$http backlog=4096;
        listen 127.0.0.1:$https ssl backlog=4096;
        server_name $HOST_HEADER;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        location / {
            proxy_pass $scheme://origin;
            $extra
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
            # pingora-vhost gives every request an id (kept from the client when valid), sends
            # it on and returns it: nginx does the same work here.
            proxy_set_header X-Request-Id \$request_id;
            add_header X-Request-Id \$request_id always;
        }
    }
}
EOF
    } > "$d/nginx.conf"
    nginx -t -q -p "$d" -c "$d/nginx.conf" >"$TMP/$name.log" 2>&1 || { show_log "$name"; die "$name config invalid"; }
    "${PIN_PROXY[@]}" nginx -p "$d" -c "$d/nginx.conf" >>"$TMP/$name.log" 2>&1 &
    PROXY_PID=$!; STARTED_PIDS+=("$PROXY_PID")
    PROXY_HTTP="$http"; PROXY_HTTPS="$https"
    wait_port "$http" "$PROXY_PID" "$name"
    wait_port "$https" "$PROXY_PID" "$name"
}

start_haproxy() {
    local d="$TMP/haproxy"; mkdir -p "$d"
    cat > "$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
    tune.ssl.default-dh-param 2048

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:$HAPROXY_HTTP
    bind 127.0.0.1:$HAPROXY_HTTPS ssl crt $COMBINED
    option forwardfor
    http-request set-header X-Forwarded-Proto https if { ssl_fc }
    http-request set-header X-Forwarded-Proto http if !{ ssl_fc }
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    # Request ids, as pingora-vhost and nginx above.
    unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
    http-request set-header X-Request-Id %[unique-id]
    http-response set-header X-Request-Id %[unique-id]
    default_backend be

backend be
    http-reuse always
    server origin 127.0.0.1:$ORIGIN_PORT pool-max-conn 64
EOF
    haproxy -c -q -f "$d/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 || { show_log haproxy; die "haproxy config invalid"; }
    "${PIN_PROXY[@]}" haproxy -db -f "$d/haproxy.cfg" >>"$TMP/haproxy.log" 2>&1 &
    PROXY_PID=$!; STARTED_PIDS+=("$PROXY_PID")
    PROXY_HTTP="$HAPROXY_HTTP"; PROXY_HTTPS="$HAPROXY_HTTPS"
    wait_port "$HAPROXY_HTTP" "$PROXY_PID" haproxy
    wait_port "$HAPROXY_HTTPS" "$PROXY_PID" haproxy
}

start_pingora_vhost() {
    pv_variant pingora-vhost "$PV_HTTP" "$PV_HTTPS" "$PV_API" "$PV_RPC" "$PV_GOSSIP" ""
}

# The same with the access log on (to a file, as nginx-log).
start_pingora_vhost_log() {
    pv_variant pingora-vhost-log "$PVL_HTTP" "$PVL_HTTPS" "$PVL_API" "$PVL_RPC" "$PVL_GOSSIP" \
        "$(printf '[access_log]\nenabled = true\noutput = "file"\nfile_path = "%s"\nformat = "%s"\n' \
            "$TMP/pingora-vhost-log/access.log" "$PV_LOG_FORMAT")"
}

# TLS to the origin (not verified, as nginx's default proxy_ssl_verify off; the name is
# sent as SNI), connections kept alive.
start_pingora_vhost_tlsup() {
    pv_variant pingora-vhost-tlsup "$PVT_HTTP" "$PVT_HTTPS" "$PVT_API" "$PVT_RPC" "$PVT_GOSSIP" "" \
        "https://127.0.0.1:$ORIGIN_TLS_PORT" \
        "$(printf '[backends.tls]\nserver_name = "%s"\nverify = false\n' "$HOST_HEADER")"
}

# Behind an HAProxy in TCP mode, without PROXY protocol: the baseline of pingora-vhost-pp.
start_pingora_vhost_front() {
    pv_variant pingora-vhost-front "$PVF_HTTP" "$PVF_HTTPS" "$PVF_API" "$PVF_RPC" "$PVF_GOSSIP" ""
    local pid="$PROXY_PID"
    start_front pingora-vhost-front "$PVF_FRONT_HTTP" "$PVF_FRONT_HTTPS" "$PVF_HTTP" "$PVF_HTTPS" ""
    PROXY_PID="$pid"
}

# The same HAProxy sends PROXY protocol v2, which pingora-vhost requires from it.
start_pingora_vhost_pp() {
    pv_variant pingora-vhost-pp "$PVP_HTTP" "$PVP_HTTPS" "$PVP_API" "$PVP_RPC" "$PVP_GOSSIP" \
        "$(printf '[proxy.proxy_protocol]\ntrusted = ["127.0.0.1/32"]\n')"
    local pid="$PROXY_PID"
    start_front pingora-vhost-pp "$PVP_FRONT_HTTP" "$PVP_FRONT_HTTPS" "$PVP_HTTP" "$PVP_HTTPS" "send-proxy-v2"
    PROXY_PID="$pid"
}

# start_front NAME FRONT_HTTP FRONT_HTTPS TO_HTTP TO_HTTPS SERVER_OPTION: an HAProxy in TCP
# mode on the load CPU in front of NAME; wrk talks to it, the CPU measured is NAME's own.
start_front() {
    local name="$1" fhttp="$2" fhttps="$3" thttp="$4" thttps="$5" opt="$6"
    local d="$TMP/$name-front"; mkdir -p "$d"
    {
        echo "global"
        echo "    nbthread 1"
        echo "    maxconn $MAXCONN"
        echo "defaults"
        echo "    mode tcp"
        echo "    timeout connect 5s"
        echo "    timeout client 300s"
        echo "    timeout server 300s"
        echo "listen http"
        echo "    bind 127.0.0.1:$fhttp"
        echo "    server pv 127.0.0.1:$thttp $opt"
        echo "listen https"
        echo "    bind 127.0.0.1:$fhttps"
        echo "    server pv 127.0.0.1:$thttps $opt"
    } > "$d/haproxy.cfg"
    haproxy -c -q -f "$d/haproxy.cfg" >"$TMP/$name-front.log" 2>&1 \
        || { show_log "$name-front"; die "$name front config invalid"; }
    "${PIN_LOAD[@]}" haproxy -db -f "$d/haproxy.cfg" >>"$TMP/$name-front.log" 2>&1 &
    local pid=$!; STARTED_PIDS+=("$pid")
    wait_port "$fhttp" "$pid" "$name-front"
    wait_port "$fhttps" "$pid" "$name-front"
    PROXY_HTTP="$fhttp"; PROXY_HTTPS="$fhttps"
}

# pv_variant NAME HTTP HTTPS API RPC GOSSIP EXTRA_CONFIG [BACKEND_ADDRESS BACKEND_EXTRA]
pv_variant() {
    local name="$1" http="$2" https="$3" api="$4" rpc="$5" gossip="$6" extra="$7"
    local backend="${8:-127.0.0.1:$ORIGIN_PORT}" backend_extra="${9:-}"
    local d="$TMP/$name"; mkdir -p "$d/data"
    PV_TOKEN="bench-$(openssl rand -hex 16)"
    cat > "$d/config.toml" <<EOF
[proxy]
listen_addr = "127.0.0.1:$https"
listen_addr_http = "127.0.0.1:$http"
management_api_addr = "127.0.0.1:$api"
threads = 1
shutdown_grace_secs = 1
# wrk sends the URL host (127.0.0.1) as SNI, so the default certificate is the one it
# negotiates: make it the same cert as the virtual host's (and as nginx/HAProxy use).
default_cert_path = "$CERT"
default_key_path = "$KEY"

[api]
token = "$PV_TOKEN"

[cluster]
node_id = 1
data_dir = "$d/data"
rpc_addr = "127.0.0.1:$rpc"
gossip_addr = "127.0.0.1:$gossip"
seeds = []
bootstrap_expect = 1

[logging]
level = "warn"

$extra

[health_check]
interval_secs = 2
timeout_secs = 1
healthy_threshold = 1
unhealthy_threshold = 3
path = "/"

[[virtual_hosts]]
domain = "$HOST_HEADER"
enabled_backends_tag = "a"
http_to_https = false
tls = "manual"
cert_path = "$CERT"
key_path = "$KEY"

[[backends]]
id = "origin"
address = "$backend"
tags = ["a"]
$backend_extra
EOF
    (cd "$d" && exec "$PV_BIN" --config "$d/config.toml" --check) >"$TMP/$name.log" 2>&1 \
        || { show_log "$name"; die "$name --check rejected $d/config.toml"; }
    (cd "$d" && exec "${PIN_PROXY[@]}" "$PV_BIN" --config "$d/config.toml") >>"$TMP/$name.log" 2>&1 &
    PROXY_PID=$!; STARTED_PIDS+=("$PROXY_PID")
    PROXY_HTTP="$http"; PROXY_HTTPS="$https"
    wait_port "$http" "$PROXY_PID" "$name" 60
    wait_port "$https" "$PROXY_PID" "$name" 60
    wait_http "$name" "$PROXY_PID" 60 "" "http://127.0.0.1:$api/api/v1/health"
}

# Waits until PROXY serves the origin's "ok" for Host: bench.local over HTTP and HTTPS.
wait_proxy_ready() {
    local name="$1"
    wait_http "$name" "$PROXY_PID" 60 "ok" -H "Host: $HOST_HEADER" "http://127.0.0.1:$PROXY_HTTP/"
    wait_http "$name" "$PROXY_PID" 60 "ok" --resolve "$HOST_HEADER:$PROXY_HTTPS:127.0.0.1" "https://$HOST_HEADER:$PROXY_HTTPS/"
    wait_http "$name" "$PROXY_PID" 60 "ok" -H "Host: $HOST_HEADER" "https://127.0.0.1:$PROXY_HTTPS/"
}

# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
declare -A RPS P50 P99 CPU_US CPU_PCT ORIGIN_PCT OTHER_PCT REQS NOTES NOISY BEST_RAW ALL_RPS
NOISY_RUNS=0

to_ms() {
    # wrk latency "812.00us" / "1.23ms" / "1.01s" / "2.00m" -> ms
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# measure NAME PROTO URL
# run_once NAME PROTO URL RAW: one measured wrk run; sets the R_* globals.
run_once() {
    local name="$1" proto="$2" url="$3" raw="$4" key="$1/$2"
    local t0 t1 w0 w1 o0 o1 m0 m1 c0 c1 reqs rps p50 p99 non2xx sockerr
    c0="$(children_ticks)"
    m0="$(machine_busy_ticks)"
    o0="$(tree_ticks "$ORIGIN_PID")"
    t0="$(tree_ticks "$PROXY_PID")"
    w0="$(date +%s.%N)"
    "${PIN_LOAD[@]}" timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
        -H "Host: $HOST_HEADER" "$url" >"$raw" 2>&1 || { cat "$raw" >&2; die "$key: wrk failed"; }
    w1="$(date +%s.%N)"
    t1="$(tree_ticks "$PROXY_PID")"
    o1="$(tree_ticks "$ORIGIN_PID")"
    m1="$(machine_busy_ticks)"
    c1="$(children_ticks)"
    [ "$t0" -ge 0 ] && [ "$t1" -ge 0 ] || { show_log "$name"; die "$name died during the run"; }

    reqs="$(awk '/requests in/ { print $1; exit }' "$raw")"
    rps="$(awk '/^Requests\/sec:/ { print $2; exit }' "$raw")"
    p50="$(awk '$1 == "50%" { print $2; exit }' "$raw")"
    p99="$(awk '$1 == "99%" { print $2; exit }' "$raw")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$raw")"
    sockerr="$(awk '/Socket errors:/ { sub(/.*Socket errors: /, ""); print; exit }' "$raw")"
    [ -n "$reqs" ] && [ -n "$rps" ] && [ -n "$p50" ] && [ -n "$p99" ] \
        || { cat "$raw" >&2; die "$key: could not parse wrk output"; }
    [ "$reqs" -gt 0 ] || { cat "$raw" >&2; die "$key: wrk completed no request"; }

    R_REQS="$reqs"
    R_RPS="$(awk -v r="$rps" 'BEGIN { printf "%.0f", r }')"
    R_P50="$(to_ms "$p50")"
    R_P99="$(to_ms "$p99")"
    R_CPU_US="$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz * 1e6 / n }')"
    R_CPU_PCT="$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", 100 * d / hz / (b - a) }')"
    R_ORIGIN_PCT="$(awk -v d=$((o1 - o0)) -v hz="$CLK_TCK" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", 100 * d / hz / (b - a) }')"
    # CPU used on this machine by anything but the proxy, the origin and wrk, as % of all CPUs.
    R_OTHER_PCT="$(awk -v d=$(( (m1 - m0) - (t1 - t0) - (o1 - o0) - (c1 - c0) )) -v hz="$CLK_TCK" \
        -v n="$NCPU_MACHINE" -v a="$w0" -v b="$w1" 'BEGIN { x = 100 * d / hz / (b - a) / n; if (x < 0) x = 0; printf "%.0f", x }')"
    R_NOISY=0
    R_NOTE=""
    if [ "$R_OTHER_PCT" -gt 10 ]; then
        R_NOISY=1
        R_NOTE="NOISY: other load ${R_OTHER_PCT}% of the machine; "
    fi
    R_ERRORS=""
    [ -n "$non2xx" ] && R_ERRORS="${R_ERRORS}non-2xx/3xx: $non2xx; "
    [ -n "$sockerr" ] && R_ERRORS="${R_ERRORS}socket errors: $sockerr; "
    return 0
}

# warm_up NAME PROTO URL
warm_up() {
    local name="$1" proto="$2" url="$3" key="$1/$2"
    [ "$WARMUP" -gt 0 ] || return 0
    log "$key: warm-up ${WARMUP}s"
    "${PIN_LOAD[@]}" timeout $((WARMUP + 30)) wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" \
        -H "Host: $HOST_HEADER" "$url" >/dev/null 2>&1 || die "$key: wrk warm-up failed"
    [ -d "/proc/$PROXY_PID" ] || { show_log "$name"; die "$name died during warm-up"; }
}

# measure_run NAME PROTO URL R: measured run R; the run with the most req/s is reported
# (all its columns come from that same run).
measure_run() {
    local name="$1" proto="$2" url="$3" r="$4" key="$1/$2" raw
    raw="$TMP/wrk-$name-$proto-$r.txt"
    log "$key: run $r/$RUNS, ${DURATION}s, $CONNECTIONS connections"
    run_once "$name" "$proto" "$url" "$raw"
    log "$key: run $r: $R_RPS req/s, p50 $R_P50 ms, p99 $R_P99 ms, $R_CPU_US us CPU/req" \
        "(proxy CPU $R_CPU_PCT%, origin CPU $R_ORIGIN_PCT%, other load $R_OTHER_PCT%)"
    [ -n "$R_NOTE$R_ERRORS" ] && log "WARNING $key run $r: $R_NOTE$R_ERRORS"
    [ -n "$R_ERRORS" ] && ERRORS_OF[$key]="${ERRORS_OF[$key]:-}run $r: $R_ERRORS"
    ALL_RPS[$key]="${ALL_RPS[$key]:+${ALL_RPS[$key]}, }$R_RPS"
    ALL_CPU[$key]="${ALL_CPU[$key]:+${ALL_CPU[$key]} }$R_CPU_US"
    if [ "$R_RPS" -gt "${RPS[$key]:--1}" ]; then
        REQS[$key]="$R_REQS"; RPS[$key]="$R_RPS"; P50[$key]="$R_P50"; P99[$key]="$R_P99"
        CPU_US[$key]="$R_CPU_US"; CPU_PCT[$key]="$R_CPU_PCT"; ORIGIN_PCT[$key]="$R_ORIGIN_PCT"
        OTHER_PCT[$key]="$R_OTHER_PCT"; NOISY[$key]="$R_NOISY"; BEST_RAW[$key]="$raw"
        BEST_NOTE[$key]="$R_NOTE"
    fi
}

# finish_measure NAME PROTO: notes of the reported run, plus errors of any run.
finish_measure() {
    local key="$1/$2" v
    [ "${NOISY[$key]}" = 1 ] && NOISY_RUNS=$((NOISY_RUNS + 1))
    v="${BEST_NOTE[$key]:-}${ERRORS_OF[$key]:-}"
    v="${v% }"; NOTES[$key]="${v%;}"
    if [ "$RUNS" -gt 1 ]; then
        log "$key: best of $RUNS runs: ${RPS[$key]} req/s (all: ${ALL_RPS[$key]}; CPU us/req: ${ALL_CPU[$key]})"
    fi
}

declare -A PID_OF HTTP_OF HTTPS_OF ERRORS_OF ALL_CPU BEST_NOTE

# use_proxy NAME: make NAME the proxy under test; every other proxy is paused (SIGSTOP) so
# that it cannot take CPU time from the one being measured.
use_proxy() {
    local p q
    for p in "${PROXIES[@]}"; do
        [ "$p" = "$1" ] && continue
        for q in $(proc_tree "${PID_OF[$p]}"); do kill -STOP "$q" 2>/dev/null || true; done
    done
    for q in $(proc_tree "${PID_OF[$1]}"); do kill -CONT "$q" 2>/dev/null || true; done
    PROXY_PID="${PID_OF[$1]}"; PROXY_HTTP="${HTTP_OF[$1]}"; PROXY_HTTPS="${HTTPS_OF[$1]}"
    sleep 0.5
}

start_all_proxies() {
    local p
    for p in "${PROXIES[@]}"; do
        log "=== start $p ==="
        "start_${p//-/_}"
        wait_proxy_ready "$p"
        PID_OF[$p]="$PROXY_PID"; HTTP_OF[$p]="$PROXY_HTTP"; HTTPS_OF[$p]="$PROXY_HTTPS"
    done
}

stop_all_proxies() {
    local p q
    for p in "${PROXIES[@]}"; do
        for q in $(proc_tree "${PID_OF[$p]}"); do kill -CONT "$q" 2>/dev/null || true; done
        kill_tree "${PID_OF[$p]}"
        forget_pid "${PID_OF[$p]}"
    done
}

# Rounds interleave the proxies: run r of every proxy happens in the same stretch of time,
# so slow drifts in the machine's speed (common on shared VMs) hit all of them alike.
run_rounds() {
    local p proto r
    for p in "${PROXIES[@]}"; do
        use_proxy "$p"
        warm_up "$p" http "http://127.0.0.1:$PROXY_HTTP/"
        warm_up "$p" https "https://127.0.0.1:$PROXY_HTTPS/"
    done
    for r in $(seq 1 "$RUNS"); do
        for p in "${PROXIES[@]}"; do
            use_proxy "$p"
            measure_run "$p" http "http://127.0.0.1:$PROXY_HTTP/" "$r"
            measure_run "$p" https "https://127.0.0.1:$PROXY_HTTPS/" "$r"
        done
    done
    for p in "${PROXIES[@]}"; do
        for proto in http https; do finish_measure "$p" "$proto"; done
    done
}

# Resident memory (KiB) of PID and all its descendants.
tree_rss_kib() {
    local q total=0 kib
    for q in $(proc_tree "$1"); do
        kib="$(awk '/^VmRSS:/ { print $2 }' "/proc/$q/status" 2>/dev/null || true)"
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# Memory per idle keep-alive connection: the proxy's RSS (all its processes) with
# IDLE_CONNS connections open and idle, each after one request, minus its RSS before.
declare -A IDLE_KIB IDLE_RSS
# restart_proxy NAME: stops NAME and starts it again (same ports, a new process).
restart_proxy() {
    local p="$1" q
    for q in $(proc_tree "${PID_OF[$p]}"); do kill -CONT "$q" 2>/dev/null || true; done
    kill_tree "${PID_OF[$p]}"
    forget_pid "${PID_OF[$p]}"
    sleep 0.5
    "start_${p//-/_}"
    wait_proxy_ready "$p"
    PID_OF[$p]="$PROXY_PID"; HTTP_OF[$p]="$PROXY_HTTP"; HTTPS_OF[$p]="$PROXY_HTTPS"
}

measure_idle_memory() {
    [ "$IDLE_CONNS" -gt 0 ] || return 0
    local p proto port tls fifo out py before after i
    for p in "${PROXIES[@]}"; do
        for proto in ${BENCH_IDLE_ORDER:-http https}; do
            # A fresh process for each protocol: measured one after the other in one process,
            # the second measurement reused memory the first had grown (TLS read 13.8 KiB per
            # connection after plain, 35.6 KiB on its own; plain then read below zero).
            restart_proxy "$p"
            use_proxy "$p"
            port="$PROXY_HTTP"; tls=()
            [ "$proto" = https ] && { port="$PROXY_HTTPS"; tls=(--tls); }
            fifo="$TMP/idle.$p.$proto.in"; out="$TMP/idle.$p.$proto.out"
            mkfifo "$fifo"
            before="$(tree_rss_kib "$PROXY_PID")"
            python3 "$SCRIPT_DIR/idle_conns.py" --port "$port" --host "$HOST_HEADER" \
                --n "$IDLE_CONNS" "${tls[@]}" <"$fifo" >"$out" 2>&1 &
            py=$!
            exec 7>"$fifo" # holds the script's stdin open: it keeps its connections
            for i in $(seq 1 240); do
                grep -q ready "$out" 2>/dev/null && break
                kill -0 "$py" 2>/dev/null || break
                sleep 0.5
            done
            grep -q ready "$out" || { exec 7>&-; cat "$out" >&2; die "idle connections to $p ($proto) failed"; }
            sleep 1
            after="$(tree_rss_kib "$PROXY_PID")"
            exec 7>&-
            wait "$py" || true
            IDLE_RSS[$p/$proto]="$after"
            IDLE_KIB[$p/$proto]="$(awk -v a="$after" -v b="$before" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }')"
            log "$p $proto: RSS $before KiB -> $after KiB with $IDLE_CONNS idle connections: ${IDLE_KIB[$p/$proto]} KiB each"
            sleep 2
        done
    done
}

# ---------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------
# Share of all CPUs busy over SECONDS (whole machine, all containers on this kernel).
machine_busy_pct() {
    local a b
    a="$(machine_busy_ticks)"; sleep "${1:-1}"; b="$(machine_busy_ticks)"
    awk -v d=$((b - a)) -v hz="$CLK_TCK" -v n="$NCPU_MACHINE" -v s="${1:-1}" \
        'BEGIN { printf "%.0f", 100 * d / hz / s / n }'
}
BUSY_BEFORE="$(machine_busy_pct 2)"
if [ "$BUSY_BEFORE" -gt 10 ]; then
    log "WARNING: the machine is already ${BUSY_BEFORE}% busy before the benchmark (other processes," \
        "maybe in other containers): numbers will be low and noisy"
fi


log "temp dir $TMP; CPUs: wrk+origin=$CPU_LOAD proxy=$CPU_PROXY; ${DURATION}s x $CONNECTIONS connections, warm-up ${WARMUP}s"
start_origin
start_all_proxies
run_rounds
measure_idle_memory
stop_all_proxies

# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
verdict() { # verdict OK_EXPR_RESULT
    if [ "$1" = 1 ]; then echo "PASS"; else echo "FAIL"; fi; }

NGINX_VER="$( (nginx -v 2>&1 || true) | sed 's/.*nginx\///')"
HAPROXY_VER="$( (haproxy -v 2>/dev/null || true) | awk 'NR==1 { print $3 }')"
WRK_VER="$( (wrk -v 2>&1 || true) | awk 'NR==1 { print $2 }')"
PV_VER="not run"
if [ "$RUN_PV" -eq 1 ]; then
    PV_VER="$(timeout 5 "$PV_BIN" --version 2>/dev/null | head -n1 || true)"
    PV_REV="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [ -n "$(git -C "$REPO_DIR" status --porcelain 2>/dev/null | head -n1)" ] && PV_REV="$PV_REV+dirty"
    PV_VER="${PV_VER:-pingora-vhost} (git $PV_REV)"
fi
CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"

md_table() {
    local proto="$1" p key
    echo "| proxy | req/s | p50 (ms) | p99 (ms) | CPU µs/req | proxy CPU % | origin CPU % | other load % | notes |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for p in "${PROXIES[@]}"; do
        key="$p/$proto"
        echo "| $p | ${RPS[$key]} | ${P50[$key]} | ${P99[$key]} | ${CPU_US[$key]} | ${CPU_PCT[$key]} | ${ORIGIN_PCT[$key]} | ${OTHER_PCT[$key]} | ${NOTES[$key]:-} |"
    done
}

# paired_ratios PROTO -> "CPU_MEDIAN RPS_MEDIAN CPU_LIST|RPS_LIST". Per round r: pingora-vhost's
# CPU/req over nginx's, and its req/s over the better of nginx and HAProxy, all three measured
# in the same round (minutes apart at most), so a drift in the VM's speed cancels out.
paired_ratios() {
    local proto="$1"
    awk -v vc="${ALL_CPU[pingora-vhost/$proto]}" -v nc="${ALL_CPU[nginx/$proto]}" \
        -v vr="${ALL_RPS[pingora-vhost/$proto]}" -v nr="${ALL_RPS[nginx/$proto]}" \
        -v hr="${ALL_RPS[haproxy/$proto]}" '
        function median(a, n,   i, j, t) {
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        BEGIN {
            gsub(/,/, "", vr); gsub(/,/, "", nr); gsub(/,/, "", hr)
            n = split(vc, V, " "); split(nc, N, " "); split(vr, VR, " "); split(nr, NG, " "); split(hr, HA, " ")
            for (i = 1; i <= n; i++) {
                c[i] = V[i] / N[i]
                r[i] = VR[i] / ((NG[i] + 0 > HA[i] + 0) ? NG[i] : HA[i])
                cl = cl sprintf("%s%.2f", (i > 1) ? " " : "", c[i])
                rl = rl sprintf("%s%.2f", (i > 1) ? " " : "", r[i])
            }
            printf "%.2f %.2f %s|%s\n", median(c, n), median(r, n), cl, rl
        }'
}

md_ratios() {
    local proto="$1" n="nginx/$1" h="haproxy/$1" v="pingora-vhost/$1" best ok
    if [ "$ALL3" -eq 0 ]; then
        echo "Ratios and targets need all three proxies; this run had: ${PROXIES[*]}."
        if [ "$BASE2" -eq 1 ]; then
            echo "haproxy/nginx: req/s $(ratio "${RPS[$h]}" "${RPS[$n]}"), CPU/req $(ratio "${CPU_US[$h]}" "${CPU_US[$n]}")."
        fi
        return
    fi
    best="$(awk -v a="${RPS[$n]}" -v b="${RPS[$h]}" 'BEGIN { print (a > b ? a : b) }')"
    echo "| ratio | value | target | verdict |"
    echo "|---|---:|---|---|"
    ok="$(awk -v v="${RPS[$v]}" -v b="$best" 'BEGIN { print ((v >= b) ? 1 : 0) }')"
    echo "| req/s pingora-vhost / nginx | $(ratio "${RPS[$v]}" "${RPS[$n]}") | | |"
    echo "| req/s pingora-vhost / haproxy | $(ratio "${RPS[$v]}" "${RPS[$h]}") | | |"
    echo "| req/s pingora-vhost / best(nginx, haproxy) | $(ratio "${RPS[$v]}" "$best") | >= 1.00 | $(verdict "$ok") |"
    ok="$(awk -v v="${CPU_US[$v]}" -v n="${CPU_US[$n]}" 'BEGIN { print ((v <= 0.9 * n) ? 1 : 0) }')"
    echo "| CPU/req pingora-vhost / nginx | $(ratio "${CPU_US[$v]}" "${CPU_US[$n]}") | <= 0.90 | $(verdict "$ok") |"
    echo "| CPU/req pingora-vhost / haproxy | $(ratio "${CPU_US[$v]}" "${CPU_US[$h]}") | | |"
    local paired cpu_med rps_med lists
    paired="$(paired_ratios "$proto")"
    read -r cpu_med rps_med lists <<< "$paired"
    ok="$(awk -v v="$rps_med" 'BEGIN { print ((v >= 1.0) ? 1 : 0) }')"
    echo "| req/s pingora-vhost / best(nginx, haproxy), median of the $RUNS rounds' ratios | $rps_med | >= 1.00 | $(verdict "$ok") |"
    ok="$(awk -v v="$cpu_med" 'BEGIN { print ((v <= 0.9) ? 1 : 0) }')"
    echo "| CPU/req pingora-vhost / nginx, median of the $RUNS rounds' ratios | $cpu_med | <= 0.90 | $(verdict "$ok") |"
    echo
    echo "Per round (same round, same minutes): CPU/req pingora-vhost / nginx: ${lists%|*}; req/s pingora-vhost / best: ${lists#*|}."
}

# paired_median A B PROTO -> median over rounds of CPU/req A / CPU/req B (same round), and
# the per-round list.
paired_median() {
    awk -v a="${ALL_CPU[$1/$3]}" -v b="${ALL_CPU[$2/$3]}" '
        BEGIN {
            n = split(a, A, " "); split(b, B, " ")
            for (i = 1; i <= n; i++) { c[i] = A[i] / B[i]; l = l sprintf("%s%.2f", (i > 1) ? " " : "", c[i]) }
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && c[j - 1] > c[j]; j--) { t = c[j]; c[j] = c[j - 1]; c[j - 1] = t }
            printf "%.2f %s\n", (n % 2) ? c[(n + 1) / 2] : (c[n / 2] + c[n / 2 + 1]) / 2, l
        }'
}

# md_access_log_ratios PROTO: issue #14's access-log targets (CPU/req with logs on <= nginx's
# with its log on; <= 1.10 x ours with logs off), medians of per-round ratios.
md_access_log_ratios() {
    local proto="$1" med list ok
    has_proxy pingora-vhost-log || return 0
    echo "| access log ($proto) | median of per-round ratios | target | verdict | per round |"
    echo "|---|---:|---|---|---|"
    if has_proxy nginx-log; then
        read -r med list <<< "$(paired_median pingora-vhost-log nginx-log "$proto")"
        ok="$(awk -v v="$med" 'BEGIN { print ((v <= 1.0) ? 1 : 0) }')"
        echo "| CPU/req pingora-vhost-log / nginx-log | $med | <= 1.00 | $(verdict "$ok") | $list |"
    fi
    if has_proxy pingora-vhost; then
        read -r med list <<< "$(paired_median pingora-vhost-log pingora-vhost "$proto")"
        ok="$(awk -v v="$med" 'BEGIN { print ((v <= 1.10) ? 1 : 0) }')"
        echo "| CPU/req pingora-vhost-log / pingora-vhost | $med | <= 1.10 | $(verdict "$ok") | $list |"
    fi
    echo
}

# md_edge_ratios PROTO: issue #14's edge targets, medians of per-round ratios.
md_edge_ratios() {
    local proto="$1" med list ok
    { has_proxy pingora-vhost-tlsup && has_proxy nginx-tlsup; } || has_proxy pingora-vhost-pp || return 0
    echo "| production edge ($proto) | median of per-round ratios | target | verdict | per round |"
    echo "|---|---:|---|---|---|"
    if has_proxy pingora-vhost-tlsup && has_proxy nginx-tlsup; then
        read -r med list <<< "$(paired_median pingora-vhost-tlsup nginx-tlsup "$proto")"
        ok="$(awk -v v="$med" 'BEGIN { print ((v <= 1.0) ? 1 : 0) }')"
        echo "| CPU/req, TLS to the origin: pingora-vhost-tlsup / nginx-tlsup | $med | <= 1.00 | $(verdict "$ok") | $list |"
    fi
    if has_proxy pingora-vhost-pp && has_proxy pingora-vhost-front; then
        read -r med list <<< "$(paired_rps_median pingora-vhost-pp pingora-vhost-front "$proto")"
        ok="$(awk -v v="$med" 'BEGIN { print ((v >= 0.95) ? 1 : 0) }')"
        echo "| req/s with PROXY v2 / without, both behind HAProxy: pingora-vhost-pp / pingora-vhost-front | $med | >= 0.95 | $(verdict "$ok") | $list |"
        read -r med list <<< "$(paired_median pingora-vhost-pp pingora-vhost-front "$proto")"
        echo "| CPU/req pingora-vhost-pp / pingora-vhost-front | $med | | | $list |"
    fi
    echo
}

# paired_rps_median A B PROTO -> median over rounds of req/s A / req/s B, and the list.
paired_rps_median() {
    awk -v a="${ALL_RPS[$1/$3]}" -v b="${ALL_RPS[$2/$3]}" '
        BEGIN {
            gsub(/,/, "", a); gsub(/,/, "", b)
            n = split(a, A, " "); split(b, B, " ")
            for (i = 1; i <= n; i++) { c[i] = A[i] / B[i]; l = l sprintf("%s%.2f", (i > 1) ? " " : "", c[i]) }
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && c[j - 1] > c[j]; j--) { t = c[j]; c[j] = c[j - 1]; c[j - 1] = t }
            printf "%.2f %s\n", (n % 2) ? c[(n + 1) / 2] : (c[n / 2] + c[n / 2 + 1]) / 2, l
        }'
}

report() {
    echo "# pingora-vhost benchmark results"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- machine: $(nproc) CPUs ($CPU_MODEL), kernel $(uname -r)"
    echo "- pinning: wrk + origin on CPU $CPU_LOAD, proxy on CPU $CPU_PROXY"
    echo "- load: wrk $WRK_VER, 1 thread, $CONNECTIONS connections, HTTP/1.1 keep-alive, \`Host: $HOST_HEADER\`; per proxy and protocol ${WARMUP}s warm-up, then $RUNS rounds; each round measures every proxy for ${DURATION}s (the others paused with SIGSTOP). The run with the most req/s is reported (every column from that run)"
    echo "- proxies (1 worker each): nginx $NGINX_VER, HAProxy $HAPROXY_VER, $PV_VER"
    echo "- origin: nginx, 1 worker, \`return 200 \"ok\\n\"\`"
    echo "- other load: machine ${BUSY_BEFORE}% busy just before the run; per run see *other load %* (CPU used by anything but proxy, origin and wrk, as % of all $NCPU_MACHINE CPUs)$( { [ "$BUSY_BEFORE" -gt 10 ] || [ "$NOISY_RUNS" -gt 0 ]; } && echo ' — **the machine was not idle: numbers are noisy**')"
    echo "- CPU µs/req: proxy utime+stime (all processes and threads) during the measured run / requests"
    echo
    for proto in http https; do
        echo "## ${proto^^}"
        echo
        md_table "$proto"
        echo
        echo "req/s of every run: $(for p in "${PROXIES[@]}"; do printf '%s: %s; ' "$p" "${ALL_RPS[$p/$proto]}"; done | sed 's/; $//')"
        echo
        echo "CPU µs/req of every run: $(for p in "${PROXIES[@]}"; do printf '%s: %s; ' "$p" "${ALL_CPU[$p/$proto]}"; done | sed 's/; $//')"
        echo
        md_ratios "$proto"
        echo
        md_access_log_ratios "$proto"
        md_edge_ratios "$proto"
    done
    if [ "$IDLE_CONNS" -gt 0 ]; then
        echo "## Memory per idle keep-alive connection"
        echo
        echo "$IDLE_CONNS connections held open and idle after one request each (bench/idle_conns.py); RSS of all the proxy's processes with them open, and (RSS with - RSS before) / $IDLE_CONNS."
        echo
        echo "| proxy | HTTP KiB/conn | HTTP RSS KiB | HTTPS KiB/conn | HTTPS RSS KiB |"
        echo "|---|---|---|---|---|"
        for p in "${PROXIES[@]}"; do
            echo "| $p | ${IDLE_KIB[$p/http]} | ${IDLE_RSS[$p/http]} | ${IDLE_KIB[$p/https]} | ${IDLE_RSS[$p/https]} |"
        done
        echo
    fi
    echo "<details><summary>raw wrk output</summary>"
    echo
    for p in "${PROXIES[@]}"; do
        for proto in http https; do
            echo "### $p / $proto (best of $RUNS runs)"
            echo
            echo '```'
            cat "${BEST_RAW[$p/$proto]}"
            echo '```'
            echo
        done
    done
    echo "</details>"
}

text_report() {
    local proto p key n h v best
    for proto in http https; do
        echo
        echo "== ${proto^^} (wrk: 1 thread, $CONNECTIONS conns, best of $RUNS x ${DURATION}s) =="
        printf '%-15s %10s %10s %10s %12s %8s %8s %8s  %s\n' proxy "req/s" "p50 ms" "p99 ms" "CPU us/req" "proxy%" "origin%" "other%" notes
        for p in "${PROXIES[@]}"; do
            key="$p/$proto"
            printf '%-15s %10s %10s %10s %12s %8s %8s %8s  %s\n' "$p" "${RPS[$key]}" "${P50[$key]}" "${P99[$key]}" \
                "${CPU_US[$key]}" "${CPU_PCT[$key]}" "${ORIGIN_PCT[$key]}" "${OTHER_PCT[$key]}" "${NOTES[$key]:-}"
        done
        n="nginx/$proto"; h="haproxy/$proto"; v="pingora-vhost/$proto"
        if [ "$ALL3" -eq 0 ]; then
            if [ "$BASE2" -eq 1 ]; then
                echo "haproxy/nginx: req/s $(ratio "${RPS[$h]}" "${RPS[$n]}"), CPU/req $(ratio "${CPU_US[$h]}" "${CPU_US[$n]}")"
            fi
            echo "(ratios to pingora-vhost and targets need all three proxies)"
            continue
        fi
        best="$(awk -v a="${RPS[$n]}" -v b="${RPS[$h]}" 'BEGIN { print (a > b ? a : b) }')"
        echo "ratios:"
        printf '  req/s   pingora-vhost/nginx   %5s   pingora-vhost/haproxy %5s   vs best %5s  (target >= 1.00: %s)\n' \
            "$(ratio "${RPS[$v]}" "${RPS[$n]}")" "$(ratio "${RPS[$v]}" "${RPS[$h]}")" "$(ratio "${RPS[$v]}" "$best")" \
            "$(verdict "$(awk -v v="${RPS[$v]}" -v b="$best" 'BEGIN { print ((v >= b) ? 1 : 0) }')")"
        printf '  CPU/req pingora-vhost/nginx   %5s   pingora-vhost/haproxy %5s                 (target <= 0.90 x nginx: %s)\n' \
            "$(ratio "${CPU_US[$v]}" "${CPU_US[$n]}")" "$(ratio "${CPU_US[$v]}" "${CPU_US[$h]}")" \
            "$(verdict "$(awk -v v="${CPU_US[$v]}" -v n="${CPU_US[$n]}" 'BEGIN { print ((v <= 0.9 * n) ? 1 : 0) }')")"
        local cpu_med rps_med lists
        read -r cpu_med rps_med lists <<< "$(paired_ratios "$proto")"
        printf '  median of per-round ratios: req/s vs best %5s (target >= 1.00: %s)   CPU/req vs nginx %5s (target <= 0.90: %s)\n' \
            "$rps_med" "$(verdict "$(awk -v v="$rps_med" 'BEGIN { print ((v >= 1.0) ? 1 : 0) }')")" \
            "$cpu_med" "$(verdict "$(awk -v v="$cpu_med" 'BEGIN { print ((v <= 0.9) ? 1 : 0) }')")"
        printf '  per round: CPU/req vs nginx %s; req/s vs best %s\n' "${lists%|*}" "${lists#*|}"
    done
    for proto in http https; do
        md_access_log_ratios "$proto"
        md_edge_ratios "$proto"
    done
}

mkdir -p "$(dirname "$RESULTS_MD")"
report > "$RESULTS_MD"
text_report
if [ "$IDLE_CONNS" -gt 0 ]; then
    echo
    echo "== memory per idle keep-alive connection ($IDLE_CONNS held; targets: pingora-vhost <= 16 KiB HTTP, <= 24 KiB HTTPS) =="
    for p in "${PROXIES[@]}"; do
        printf '  %-14s HTTP %6s KiB/conn (RSS %s KiB)   HTTPS %6s KiB/conn (RSS %s KiB)\n' "$p" \
            "${IDLE_KIB[$p/http]}" "${IDLE_RSS[$p/http]}" "${IDLE_KIB[$p/https]}" "${IDLE_RSS[$p/https]}"
    done
fi
echo
if [ "$BUSY_BEFORE" -gt 10 ] || [ "$NOISY_RUNS" -gt 0 ]; then
    log "WARNING: other processes used the CPUs (${BUSY_BEFORE}% busy before the run; $NOISY_RUNS reported result(s) marked NOISY):" \
        "treat these numbers as noisy and re-run on an idle machine"
fi
log "results written to $RESULTS_MD"

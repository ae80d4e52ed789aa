# shellcheck shell=bash
# Variables set here are read by the scripts that source this file, and the other way round:
# shellcheck disable=SC2034,SC2153
# Shared by bench/run.sh and bench/shapes.sh (sourced, never run on its own): prerequisites,
# CPU pinning, process bookkeeping and cleanup, ports, the certificate, the origin, the
# nginx / HAProxy / pingora-vhost configs, CPU accounting around one client run, medians of
# per-round ratios.
#
# The sourcing script sets before it calls these functions:
#   SCRIPT_DIR REPO_DIR   bench/ and the repository
#   BENCH_PROG            its name, for messages ("run.sh", "shapes.sh")
#   HOST_HEADER           the virtual host every request asks for
#   PROXIES               array of proxy names; start_<name> (dashes as underscores) starts one
# and may set (defaults keep bench/run.sh's historical configs):
#   UPSTREAM_POOL=64          idle keep-alive connections to the origin kept by nginx
#                             (`keepalive`) and HAProxy (`pool-max-conn`)
#   NGINX_TLS_LISTEN_OPTS=""  extra parameters of nginx's TLS `listen` (e.g. "http2")
#   HAPROXY_TLS_BIND_OPTS=""  extra options of HAProxy's TLS `bind` (e.g. "alpn h2,http/1.1")
#   ORIGIN_BIG_BYTES=0        > 0: the origin also serves a body of that many bytes at /big

log()  { printf '[bench] %s\n' "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# bench_usage FILE: the comment block at the top of FILE (after the #! line).
bench_usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# require_uints VAR...: each BENCH_-configured variable is a non-negative integer.
require_uints() {
    local v
    for v in "$@"; do
        case "${!v}" in
            ''|*[!0-9]*) echo "$BENCH_PROG: BENCH_$v must be a non-negative integer, got '${!v}'" >&2; exit 2 ;;
        esac
    done
}

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        die "run as root (it installs packages with apt-get and binds loopback ports)"
    fi
}

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

# need_base_tools: what every benchmark here uses; sets CLK_TCK and NCPU_MACHINE.
need_base_tools() {
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
    NCPU_MACHINE="$(grep -c '^cpu[0-9]' /proc/stat)"
}

# raise_fd_limit MAXCONN: nginx and HAProxy get MAXCONN connections each (client + upstream
# ones counted by the caller, one descriptor each); the open-file limit, which every process
# started here inherits, must allow that and a margin. Only root with CAP_SYS_RESOURCE can go
# past the hard limit (20,000 on the machines seen here), so nothing asks for more.
raise_fd_limit() {
    MAXCONN="$1"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((MAXCONN + 64)) ]; then
        die "open-file limit $(ulimit -n) too low for $MAXCONN connections per proxy"
    fi
}

# ensure_pv_binary SKIP_BUILD: builds pingora-vhost (cargo build --release) unless SKIP_BUILD
# is 1, and checks that PV_BIN is there.
ensure_pv_binary() {
    PV_BIN="${BENCH_PV_BIN:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/pingora-vhost}"
    if [ "$1" -eq 0 ]; then
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
}

# ---------------------------------------------------------------------------------------
# CPU pinning: the load (client + origin) on one CPU, the proxy under test alone on another.
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

# setup_pinning: sets CPU_LOAD, CPU_PROXY, PIN and the command prefixes PIN_LOAD / PIN_PROXY
# (arrays, so `exec` and `$!` reach the real program, not a shell function).
setup_pinning() {
    local -a allowed
    read -r -a allowed <<< "$(expand_cpulist "$(taskset -pc $$ | sed 's/.*: *//')")"
    PIN=0
    if [ "${#allowed[@]}" -ge 2 ]; then
        CPU_LOAD="${BENCH_CPU_LOAD:-${allowed[0]}}"
        CPU_PROXY="${BENCH_CPU_PROXY:-${allowed[1]}}"
        PIN=1
    else
        log "fewer than 2 CPUs available: running without CPU pinning"
        CPU_LOAD="-"; CPU_PROXY="-"
    fi
    PIN_LOAD=(); PIN_PROXY=()
    if [ "$PIN" -eq 1 ]; then PIN_LOAD=(taskset -c "$CPU_LOAD"); PIN_PROXY=(taskset -c "$CPU_PROXY"); fi
}

# ---------------------------------------------------------------------------------------
# Temp dir, process bookkeeping, cleanup
# ---------------------------------------------------------------------------------------
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
# CPU ticks of this shell's reaped children (the client, via timeout/taskset, ends up here).
children_ticks() {
    local line
    line="$(cat /proc/$$/stat)"; line="${line##*) }"
    awk -v l="$line" 'BEGIN { split(l, f, " "); print f[14] + f[15] }'
}

# Share of all CPUs busy over SECONDS (whole machine, all containers on this kernel).
machine_busy_pct() {
    local a b
    a="$(machine_busy_ticks)"; sleep "${1:-1}"; b="$(machine_busy_ticks)"
    awk -v d=$((b - a)) -v hz="$CLK_TCK" -v n="$NCPU_MACHINE" -v s="${1:-1}" \
        'BEGIN { printf "%.0f", 100 * d / hz / s / n }'
}

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

# bench_tmp_init: TMP (removed on exit unless BENCH_KEEP_TMP=1) and the traps that kill
# everything started (STARTED_PIDS) on exit, error or signal.
bench_tmp_init() {
    TMP="$(mktemp -d /tmp/pv-bench.XXXXXX)"
    chmod 755 "$TMP"
    STARTED_PIDS=()
    trap cleanup EXIT
    set -E
    trap 'log "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

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
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# take_port VAR: next port from NEXT_PORT (starts at PORT_BASE) with no TCP listener on 127.0.0.1
take_port() {
    NEXT_PORT="${NEXT_PORT:-$PORT_BASE}"
    while port_busy "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    [ "$NEXT_PORT" -le 65535 ] || die "no free port at or above $PORT_BASE"
    printf -v "$1" '%s' "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT + 1))
}

# take_base_ports: the origin's and the three proxies' ports.
take_base_ports() {
    take_port ORIGIN_PORT
    take_port NGINX_HTTP;  take_port NGINX_HTTPS
    take_port HAPROXY_HTTP; take_port HAPROXY_HTTPS
    take_port PV_HTTP; take_port PV_HTTPS; take_port PV_API; take_port PV_RPC; take_port PV_GOSSIP
}

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
# Certificate (shared by all proxies)
# ---------------------------------------------------------------------------------------
make_cert() {
    CERT="$TMP/cert.pem"; KEY="$TMP/key.pem"; COMBINED="$TMP/combined.pem"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$KEY" -out "$CERT" -days 2 -subj "/CN=$HOST_HEADER" \
        -addext "subjectAltName=DNS:$HOST_HEADER,DNS:localhost,IP:127.0.0.1" >/dev/null 2>&1 \
        || die "openssl could not make the self-signed certificate"
    cat "$CERT" "$KEY" > "$COMBINED"
    chmod 644 "$CERT" "$KEY" "$COMBINED"
}

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
worker_rlimit_nofile $((MAXCONN + 64));
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

# start_origin: ORIGIN_PORT (plain) and ORIGIN_TLS_PORT (TLS, when set); with
# ORIGIN_BIG_BYTES > 0 also a static body of that size at /big.
start_origin() {
    local d="$TMP/origin" big=""; mkdir -p "$d"
    if [ "${ORIGIN_BIG_BYTES:-0}" -gt 0 ]; then
        head -c "$ORIGIN_BIG_BYTES" /dev/urandom > "$d/big"
        big="location = /big { root $d; default_type application/octet-stream; }"
    fi
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
EOF
        if [ -n "${ORIGIN_TLS_PORT:-}" ]; then cat <<EOF
        # For the TLS-to-backend variants (BENCH_EDGE): the same answer over TLS.
        listen 127.0.0.1:$ORIGIN_TLS_PORT ssl backlog=4096;
EOF
        fi
        cat <<EOF
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
EOF
        [ -z "$big" ] || echo "        $big"
        cat <<EOF
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
        keepalive ${UPSTREAM_POOL:-64};
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$http backlog=4096;
        listen 127.0.0.1:$https ssl${NGINX_TLS_LISTEN_OPTS:+ $NGINX_TLS_LISTEN_OPTS} backlog=4096;
        server_name $HOST_HEADER;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        # TLS 1.3 as well, as the other two offer it: nginx 1.22's built-in default stops at
        # TLS 1.2 (1.23.4 added 1.3; Debian's packaged nginx.conf lists it). Without this the
        # TLS shapes compared nginx's TLS 1.2 (whose resumption makes no key exchange) with
        # the others' TLS 1.3 (sessions 11-15 before this line).
        ssl_protocols TLSv1.2 TLSv1.3;
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
    # HAProxy reserves two descriptors per connection (client and server) and by default
    # refuses to start when it cannot raise its limit to that; the idle connections of the
    # memory figure hold one each, which the limit covers.
    no strict-limits
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
    bind 127.0.0.1:$HAPROXY_HTTPS ssl crt $COMBINED${HAPROXY_TLS_BIND_OPTS:+ $HAPROXY_TLS_BIND_OPTS}
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
    server origin 127.0.0.1:$ORIGIN_PORT pool-max-conn ${UPSTREAM_POOL:-64}
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
# Running the proxies one at a time
# ---------------------------------------------------------------------------------------
declare -A PID_OF HTTP_OF HTTPS_OF

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

# ---------------------------------------------------------------------------------------
# One measured client run
# ---------------------------------------------------------------------------------------
# measure_client NAME RAW TIMEOUT_S CMD...: runs CMD on the load CPU (killed after TIMEOUT_S),
# its output in RAW, with the CPU ticks of the proxy under test (PROXY_PID), of the origin,
# of the client and of the whole machine read just before and just after. Sets M_RC (CMD's
# exit status), M_TICKS (proxy ticks), M_WALL (s), M_PROXY_PCT, M_ORIGIN_PCT, M_OTHER_PCT (CPU
# used by anything but proxy, origin and client, as % of all CPUs), M_NOISY (1 above 10 %).
# Dies if the proxy is gone afterwards.
measure_client() {
    local name="$1" raw="$2" t="$3"; shift 3
    local t0 t1 w0 w1 o0 o1 m0 m1 c0 c1
    c0="$(children_ticks)"
    m0="$(machine_busy_ticks)"
    o0="$(tree_ticks "$ORIGIN_PID")"
    t0="$(tree_ticks "$PROXY_PID")"
    w0="$(date +%s.%N)"
    M_RC=0
    "${PIN_LOAD[@]}" timeout "$t" "$@" >"$raw" 2>&1 || M_RC=$?
    w1="$(date +%s.%N)"
    t1="$(tree_ticks "$PROXY_PID")"
    o1="$(tree_ticks "$ORIGIN_PID")"
    m1="$(machine_busy_ticks)"
    c1="$(children_ticks)"
    [ "$t0" -ge 0 ] && [ "$t1" -ge 0 ] || { show_log "$name"; die "$name died during the run"; }
    M_TICKS=$((t1 - t0))
    M_WALL="$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.3f", b - a }')"
    M_PROXY_PCT="$(awk -v d="$M_TICKS" -v hz="$CLK_TCK" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", 100 * d / hz / (b - a) }')"
    M_ORIGIN_PCT="$(awk -v d=$((o1 - o0)) -v hz="$CLK_TCK" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", 100 * d / hz / (b - a) }')"
    M_OTHER_PCT="$(awk -v d=$(( (m1 - m0) - M_TICKS - (o1 - o0) - (c1 - c0) )) -v hz="$CLK_TCK" \
        -v n="$NCPU_MACHINE" -v a="$w0" -v b="$w1" 'BEGIN { x = 100 * d / hz / (b - a) / n; if (x < 0) x = 0; printf "%.0f", x }')"
    M_NOISY=0
    [ "$M_OTHER_PCT" -gt 10 ] && M_NOISY=1
    return 0
}

# cpu_us TICKS COUNT -> µs of CPU per unit ("n/a" when COUNT is 0)
cpu_us() {
    awk -v d="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { if (n + 0 <= 0) print "n/a"; else printf "%.2f", d / hz * 1e6 / n }'
}

to_ms() {
    # wrk latency "812.00us" / "1.23ms" / "1.01s" / "2.00m" -> ms
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# parse_wrk RAW: W_REQS, W_RPS, W_P50, W_P99 (as printed; empty when absent), W_MIB (MiB
# read), W_NON2XX, W_SOCKERR.
parse_wrk() {
    local raw="$1"
    W_REQS="$(awk '/requests in/ { print $1; exit }' "$raw")"
    W_RPS="$(awk '/^Requests\/sec:/ { print $2; exit }' "$raw")"
    W_P50="$(awk '$1 == "50%" { print $2; exit }' "$raw")"
    W_P99="$(awk '$1 == "99%" { print $2; exit }' "$raw")"
    # "12345 requests in 8.00s, 12.06GB read" (wrk's units are powers of 1024)
    W_MIB="$(awk '/requests in/ { v = $5; n = v + 0; u = v; sub(/^[0-9.]+/, "", u); sub(/read$/, "", u)
        m = (u == "KB") ? 1 / 1024 : (u == "MB") ? 1 : (u == "GB") ? 1024 : (u == "TB") ? 1048576 : 1 / 1048576
        printf "%.3f", n * m; exit }' "$raw")"
    W_NON2XX="$(awk '/Non-2xx or 3xx responses:/ { print $NF; exit }' "$raw")"
    W_SOCKERR="$(awk '/Socket errors:/ { sub(/.*Socket errors: /, ""); print; exit }' "$raw")"
}

# ---------------------------------------------------------------------------------------
# Ratios and medians
# ---------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
verdict() { # verdict OK_EXPR_RESULT
    if [ "$1" = 1 ]; then echo "PASS"; else echo "FAIL"; fi; }

# Lists are one value per round, separated by spaces (commas are ignored, so wrk's req/s
# lists "1, 2, 3" work too); a value that is not a number (n/a, -) is a missing round.
_LIST_AWK='
    function num(x) { return x ~ /^-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$/ }
    function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++)
            for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }'

# median_of_ratios "A LIST" "B LIST" -> "MEDIAN LIST": the median over rounds of A[i] / B[i]
# and the per-round ratios (%.2f; "-" for a round missing on either side). MEDIAN is n/a when
# no round has both.
median_of_ratios() {
    awk -v a="$1" -v b="$2" "$_LIST_AWK"'
        BEGIN {
            gsub(/,/, "", a); gsub(/,/, "", b)
            n = split(a, A, " "); split(b, B, " "); k = 0
            for (i = 1; i <= n; i++) {
                if (num(A[i]) && num(B[i]) && B[i] + 0 != 0) {
                    c[++k] = A[i] / B[i]; l = l sprintf("%s%.2f", (i > 1) ? " " : "", A[i] / B[i])
                } else l = l ((i > 1) ? " " : "") "-"
            }
            if (k == 0) printf "n/a %s\n", l; else printf "%.2f %s\n", median(c, k), l
        }'
}

# list_median "LIST" -> median of its numbers (n/a if none), printed with FORMAT (%.2f)
list_median() {
    awk -v a="$1" -v f="${2:-%.2f}" "$_LIST_AWK"'
        BEGIN { gsub(/,/, "", a); n = split(a, A, " "); k = 0
            for (i = 1; i <= n; i++) if (num(A[i])) c[++k] = A[i]
            if (k == 0) print "n/a"; else printf f "\n", median(c, k) }'
}

# list_pick min|max "LIST1" "LIST2" -> per round, the smaller / larger of the two ("-" if
# either is missing).
list_pick() {
    awk -v how="$1" -v a="$2" -v b="$3" "$_LIST_AWK"'
        BEGIN { gsub(/,/, "", a); gsub(/,/, "", b); n = split(a, A, " "); split(b, B, " ")
            for (i = 1; i <= n; i++) {
                if (!num(A[i]) || !num(B[i])) v = "-"
                else if (how == "min") v = (A[i] + 0 < B[i] + 0) ? A[i] : B[i]
                else v = (A[i] + 0 > B[i] + 0) ? A[i] : B[i]
                l = l ((i > 1) ? " " : "") v
            }
            print l }'
}

# meets VALUE OP BOUND -> 1 if VALUE OP BOUND holds (OP: <=, <, >=), else 0 (also for n/a)
meets() {
    awk -v v="$1" -v op="$2" -v b="$3" 'BEGIN {
        if (v !~ /^[0-9.]+$/) { print 0; exit }
        if (op == "<=") print (v + 0 <= b + 0) ? 1 : 0
        else if (op == "<") print (v + 0 < b + 0) ? 1 : 0
        else print (v + 0 >= b + 0) ? 1 : 0 }'
}

# ---------------------------------------------------------------------------------------
# Report header
# ---------------------------------------------------------------------------------------
# collect_versions: NGINX_VER HAPROXY_VER WRK_VER PV_VER CPU_MODEL (PV_VER "not run" unless
# RUN_PV is 1).
collect_versions() {
    NGINX_VER="$( (nginx -v 2>&1 || true) | sed 's/.*nginx\///')"
    HAPROXY_VER="$( (haproxy -v 2>/dev/null || true) | awk 'NR==1 { print $3 }')"
    WRK_VER="$( (wrk -v 2>&1 || true) | awk 'NR==1 { print $2 }')"
    PV_VER="not run"
    if [ "${RUN_PV:-0}" -eq 1 ]; then
        local rev
        PV_VER="$(timeout 5 "$PV_BIN" --version 2>/dev/null | head -n1 || true)"
        rev="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        [ -n "$(git -C "$REPO_DIR" status --porcelain 2>/dev/null | head -n1)" ] && rev="$rev+dirty"
        PV_VER="${PV_VER:-pingora-vhost} (git $rev)"
    fi
    CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
}

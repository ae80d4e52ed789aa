#!/usr/bin/env bash
# Traffic shapes of issue #16: pingora-vhost beside nginx and HAProxy, same origin, one worker
# each, the proxy alone on its CPU, interleaved rounds, medians of per-round ratios.
#
#   bench/shapes.sh [--only-baselines | --only nginx,haproxy,pingora-vhost] [--skip-build] [--help]
#
#   --only-baselines  nginx and HAProxy only (no cargo build, no pingora-vhost, no verdicts)
#   --only LIST       only the listed proxies (comma-separated); verdicts need all three
#   --skip-build      do not run `cargo build --release`; use the existing binary
#
# Shapes (BENCH_SHAPES, comma-separated; default all of them, measured in this order):
#   h2         HTTP/2 over TLS: h2load -t1 -c64 -m10 (every proxy offers h2 by ALPN: nginx
#              `listen ... ssl http2`, HAProxy `alpn h2,http/1.1`, pingora-vhost always does);
#              CPU µs/request and req/s
#   close      a new TCP connection per request: wrk -H 'Connection: close', plain HTTP
#   close-tls  a new TLS connection per request from a client that resumes its session: wrk
#              -H 'Connection: close' over HTTPS (wrk keeps the session across reconnects)
#   resume     TLS resumption: openssl s_time -reuse; CPU µs/connection (and % resumed). Every
#              proxy offers TLS 1.2 and 1.3, so this is TLS 1.3 (an X25519 exchange per
#              resumption)
#   resume12   the same with the client held to TLS 1.2 (s_time -tls1_2): a resumption
#              without a key exchange
#   full-tls   full TLS handshakes: openssl s_time -new; CPU µs/connection
#   big        1 MiB responses (the origin's /big), keep-alive, wrk: CPU µs/request and per MiB
#   sweep      plain HTTP/1.1 keep-alive, wrk at each BENCH_SWEEP connection count:
#              CPU µs/request vs nginx
# Every s_time connection sends one request (HTTP/1.1, Host: bench.local, Connection: close)
# and reads the answer to the end, so that TLS 1.3 session tickets reach the client.
#
# CPU per request / connection = the proxy's own utime+stime (all its processes and threads,
# from /proc) during the client's run / what the client completed. Each round measures every
# shape on every proxy, the proxies of one shape back to back (their order rotates by round),
# so the ratios of a round compare runs seconds apart. Reported per shape: every round's
# figures, the median of the per-round ratios, and issue #16's target with a verdict. A run that
# misses a target still exits 0; only a setup failure makes the script fail. Memory per idle
# connection (#16 item 4) is measured by bench/run.sh (BENCH_IDLE_CONNS=10000).
#
# Run as root on Debian (missing packages are installed with apt-get: nginx, haproxy, wrk,
# nghttp2-client, openssl, curl). Everything it starts is killed on exit and its temp dir
# removed. A full run (defaults) takes about 30 minutes; it never starts a round after
# BENCH_MAX_SECONDS.
#
# Environment overrides:
#   BENCH_SHAPES=h2,close,close-tls,resume,resume12,full-tls,big,sweep
#   BENCH_DURATION=8        measured seconds per client run
#   BENCH_WARMUP=2          warm-up seconds of every shape on every proxy, before the rounds
#   BENCH_RUNS=5            rounds
#   BENCH_CONNECTIONS=50    wrk connections of close, close-tls and big (wrk always 1 thread)
#   BENCH_H2_CONNS=64 BENCH_H2_STREAMS=10   h2load connections and streams per connection
#   BENCH_SWEEP="16 64 256 1000"            connection counts of the keep-alive sweep
#   BENCH_BIG_BYTES=1048576 body size of /big
#   BENCH_UPSTREAM_POOL=1024  idle origin connections nginx (`keepalive`) and HAProxy
#                           (`pool-max-conn`) keep; pingora-vhost keeps up to 1024 per address
#   BENCH_MAX_SECONDS=3600  no new round (nor shape of a round) starts after this many seconds
#   BENCH_PORT_BASE=18600   first loopback port tried; busy ports are skipped
#   BENCH_CPU_LOAD / BENCH_CPU_PROXY   CPUs for client+origin / for the proxy
#                           (default: first and second CPU of this process's affinity)
#   BENCH_PV_BIN=path       pingora-vhost binary (default <target dir>/release/pingora-vhost)
#   BENCH_RESULTS=path      markdown report (default bench/results/shapes.md)
#   BENCH_KEEP_TMP=1        keep the temp dir (configs, logs, raw client output)

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
BENCH_PROG=shapes.sh
# shellcheck source=bench/lib.sh
. "$SCRIPT_DIR/lib.sh"

ALL_SHAPES="h2,close,close-tls,resume,resume12,full-tls,big,sweep"
SHAPES="${BENCH_SHAPES:-$ALL_SHAPES}"
DURATION="${BENCH_DURATION:-8}"
WARMUP="${BENCH_WARMUP:-2}"
RUNS="${BENCH_RUNS:-5}"
CONNECTIONS="${BENCH_CONNECTIONS:-50}"
H2_CONNS="${BENCH_H2_CONNS:-64}"
H2_STREAMS="${BENCH_H2_STREAMS:-10}"
SWEEP="${BENCH_SWEEP:-16 64 256 1000}"
BIG_BYTES="${BENCH_BIG_BYTES:-1048576}"
UPSTREAM_POOL="${BENCH_UPSTREAM_POOL:-1024}"
MAX_SECONDS="${BENCH_MAX_SECONDS:-3600}"
PORT_BASE="${BENCH_PORT_BASE:-18600}"
RESULTS_MD="${BENCH_RESULTS:-$SCRIPT_DIR/results/shapes.md}"
HOST_HEADER="bench.local"

PROXIES=(nginx haproxy pingora-vhost)
SKIP_BUILD=0

usage() { bench_usage "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --only-baselines) PROXIES=(nginx haproxy) ;;
        --only)
            [ $# -ge 2 ] || { echo "shapes.sh: --only needs a list" >&2; exit 2; }
            IFS=, read -r -a PROXIES <<< "$2"; shift
            for p in "${PROXIES[@]}"; do
                case "$p" in nginx|haproxy|pingora-vhost) ;;
                    *) echo "shapes.sh: --only: unknown proxy '$p' (nginx, haproxy, pingora-vhost)" >&2; exit 2 ;;
                esac
            done ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "shapes.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

require_uints DURATION WARMUP RUNS CONNECTIONS H2_CONNS H2_STREAMS BIG_BYTES UPSTREAM_POOL MAX_SECONDS PORT_BASE
[ "$DURATION" -ge 1 ] || { echo "shapes.sh: BENCH_DURATION must be >= 1" >&2; exit 2; }
[ "$RUNS" -ge 1 ] || { echo "shapes.sh: BENCH_RUNS must be >= 1" >&2; exit 2; }
for v in CONNECTIONS H2_CONNS H2_STREAMS BIG_BYTES UPSTREAM_POOL; do
    [ "${!v}" -ge 1 ] || { echo "shapes.sh: BENCH_$v must be >= 1" >&2; exit 2; }
done
for n in $SWEEP; do
    case "$n" in ''|*[!0-9]*|0) echo "shapes.sh: BENCH_SWEEP: '$n' is not a positive integer" >&2; exit 2 ;; esac
done

# UNITS: what is measured, in order; the sweep is one unit per connection count (ka-N).
UNITS=()
IFS=, read -r -a _shapes <<< "$SHAPES"
for s in "${_shapes[@]}"; do
    case "$s" in
        h2|close|close-tls|resume|resume12|full-tls|big) UNITS+=("$s") ;;
        sweep) for n in $SWEEP; do UNITS+=("ka-$n"); done ;;
        *) echo "shapes.sh: BENCH_SHAPES: unknown shape '$s' ($ALL_SHAPES)" >&2; exit 2 ;;
    esac
done
[ "${#UNITS[@]}" -ge 1 ] || { echo "shapes.sh: BENCH_SHAPES is empty" >&2; exit 2; }
has_unit() { local u; for u in "${UNITS[@]}"; do [ "$u" = "$1" ] && return 0; done; return 1; }
has_proxy() { local p; for p in "${PROXIES[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
RUN_PV=0; has_proxy pingora-vhost && RUN_PV=1
ALL3=0; has_proxy nginx && has_proxy haproxy && [ "$RUN_PV" -eq 1 ] && ALL3=1

require_root
need_base_tools
has_unit h2 && need_cmd h2load nghttp2-client

# File descriptors: the most client connections of any shape, as many to the origin, margin.
max_conns="$CONNECTIONS"
for n in $SWEEP "$H2_CONNS"; do [ "$n" -gt "$max_conns" ] && max_conns="$n"; done
raise_fd_limit $(( max_conns * 2 + 1024 ))

if [ "$RUN_PV" -eq 1 ]; then ensure_pv_binary "$SKIP_BUILD"; fi
setup_pinning
bench_tmp_init
take_base_ports
make_cert

# What lib.sh's configs add for these shapes (bench/run.sh keeps its defaults).
NGINX_TLS_LISTEN_OPTS="http2"
HAPROXY_TLS_BIND_OPTS="alpn h2,http/1.1"
ORIGIN_BIG_BYTES=0
has_unit big && ORIGIN_BIG_BYTES="$BIG_BYTES"

# The request every s_time connection sends: s_time writes "GET <page> HTTP/1.0\r\n\r\n",
# so the page carries the request line's end and the headers; " HTTP/1.0" ends up as the
# value of the last (unused) header.
STIME_PAGE="$(printf '/ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nX-Bench: s_time' "$HOST_HEADER")"

# ---------------------------------------------------------------------------------------
# One client run of one shape on the proxy under test
# ---------------------------------------------------------------------------------------
# Each *_unit sets U_COUNT (requests or connections completed), U_RATE (per second),
# U_CPU (proxy CPU µs per request or connection; n/a when nothing completed), U_EXTRA (big:
# CPU µs per MiB; s_time: % of connections resumed; else -), U_NOTE (problems, or empty).

# wrk_unit NAME RAW SECONDS CONNECTIONS URL [wrk options...]
wrk_unit() {
    local name="$1" raw="$2" secs="$3" conns="$4" url="$5"; shift 5
    measure_client "$name" "$raw" $((secs + 30)) wrk -t1 -c"$conns" -d"${secs}s" \
        -H "Host: $HOST_HEADER" "$@" "$url"
    parse_wrk "$raw"
    U_COUNT="${W_REQS:-0}"
    U_RATE="$(awk -v r="${W_RPS:-0}" 'BEGIN { printf "%.0f", r }')"
    U_CPU="$(cpu_us "$M_TICKS" "$U_COUNT")"
    [ "$M_RC" -eq 0 ] || U_NOTE="${U_NOTE}wrk exit $M_RC; "
    [ -n "$W_NON2XX" ] && U_NOTE="${U_NOTE}non-2xx/3xx: $W_NON2XX; "
    [ -n "$W_SOCKERR" ] && U_NOTE="${U_NOTE}socket errors: $W_SOCKERR; "
    return 0
}

# h2_unit NAME RAW SECONDS
h2_unit() {
    local name="$1" raw="$2" secs="$3" proto failed
    measure_client "$name" "$raw" $((secs + 30)) h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D "$secs" \
        -H ":authority: $HOST_HEADER" "https://127.0.0.1:$PROXY_HTTPS/"
    # "requests: 3 total, 3 started, 3 done, 3 succeeded, 0 failed, 0 errored, 0 timeout"
    U_COUNT="$(awk '/^requests:/ { for (i = 3; i <= NF; i++) if ($i ~ /^succeeded/) { print $(i - 1) + 0; exit } }' "$raw")"
    U_COUNT="${U_COUNT:-0}"
    failed="$(awk '/^requests:/ { for (i = 3; i <= NF; i++) if ($i ~ /^(failed|errored|timeout)/) n += $(i - 1); print n + 0; exit }' "$raw")"
    U_RATE="$(awk '/^finished in/ { printf "%.0f", $4; exit }' "$raw")"
    U_RATE="${U_RATE:-0}"
    proto="$(awk -F': ' '/^Application protocol:/ { print $2; exit }' "$raw")"
    U_CPU="$(cpu_us "$M_TICKS" "$U_COUNT")"
    [ "$M_RC" -eq 0 ] || U_NOTE="${U_NOTE}h2load exit $M_RC; "
    [ "$proto" = h2 ] || U_NOTE="${U_NOTE}ALPN gave '${proto:-nothing}', not h2; "
    [ "${failed:-0}" -eq 0 ] || U_NOTE="${U_NOTE}$failed requests failed/errored/timed out; "
    awk '/^status codes:/ { if ($5 + $7 + $9 > 0) exit 1 }' "$raw" \
        || U_NOTE="${U_NOTE}$(awk '/^status codes:/ { sub(/^status codes: /, ""); print; exit }' "$raw"); "
    return 0
}

# stime_unit NAME RAW SECONDS -new|-reuse [s_time options]
stime_unit() {
    local name="$1" raw="$2" secs="$3" mode="$4" marks
    shift 4
    measure_client "$name" "$raw" $((secs + 30)) openssl s_time -connect "127.0.0.1:$PROXY_HTTPS" \
        "$mode" -time "$secs" -www "$STIME_PAGE" "$@"
    # "1234 connections in 9 real seconds, 56 bytes read per connection" (the last such line)
    U_COUNT="$(awk '/ connections in .* real seconds/ { n = $1 } END { print n + 0 }' "$raw")"
    U_RATE="$(awk -v n="$U_COUNT" -v w="$M_WALL" 'BEGIN { printf "%.0f", (w > 0) ? n / w : 0 }')"
    U_CPU="$(cpu_us "$M_TICKS" "$U_COUNT")"
    # One mark per connection: r = resumed, anything else = a full handshake.
    marks="$(awk '/^[rt23*]+$/ { all += length($0); r += gsub(/r/, "") } END { print r + 0, all + 0 }' "$raw")"
    U_EXTRA="$(awk -v m="$marks" 'BEGIN { split(m, a, " "); if (a[2] > 0) printf "%.0f", 100 * a[1] / a[2]; else print "-" }')"
    [ "$M_RC" -eq 0 ] || U_NOTE="${U_NOTE}s_time exit $M_RC; "
    if grep -q 'bytes read per connection' "$raw" && [ "$U_COUNT" -gt 0 ] \
        && [ "$(awk '/bytes read per connection/ { n = $7 } END { print n + 0 }' "$raw")" -eq 0 ]; then
        U_NOTE="${U_NOTE}no answer read; "
    fi
    if [ "$mode" = -reuse ] && [ "$U_EXTRA" != "-" ] && [ "$U_EXTRA" -lt 90 ]; then
        U_NOTE="${U_NOTE}only $U_EXTRA% resumed; "
    fi
    return 0
}

# run_unit NAME UNIT RAW SECONDS
run_unit() {
    local name="$1" unit="$2" raw="$3" secs="$4"
    U_COUNT=0; U_RATE=0; U_CPU="n/a"; U_EXTRA="-"; U_NOTE=""
    case "$unit" in
        h2)        h2_unit "$name" "$raw" "$secs" ;;
        close)     wrk_unit "$name" "$raw" "$secs" "$CONNECTIONS" "http://127.0.0.1:$PROXY_HTTP/" -H "Connection: close" ;;
        close-tls) wrk_unit "$name" "$raw" "$secs" "$CONNECTIONS" "https://127.0.0.1:$PROXY_HTTPS/" -H "Connection: close" ;;
        resume)    stime_unit "$name" "$raw" "$secs" -reuse ;;
        resume12)  stime_unit "$name" "$raw" "$secs" -reuse -tls1_2 ;;
        full-tls)  stime_unit "$name" "$raw" "$secs" -new ;;
        big)
            wrk_unit "$name" "$raw" "$secs" "$CONNECTIONS" "http://127.0.0.1:$PROXY_HTTP/big"
            U_EXTRA="$(awk -v d="$M_TICKS" -v hz="$CLK_TCK" -v m="${W_MIB:-0}" \
                'BEGIN { if (m + 0 <= 0) print "n/a"; else printf "%.2f", d / hz * 1e6 / m }')" ;;
        ka-*)      wrk_unit "$name" "$raw" "$secs" "${unit#ka-}" "http://127.0.0.1:$PROXY_HTTP/" ;;
        *) die "unknown unit $unit" ;;
    esac
    [ "$U_COUNT" -gt 0 ] || U_NOTE="${U_NOTE}nothing completed; "
    return 0
}

# ---------------------------------------------------------------------------------------
# What each unit is, and issue #16's target for it
# ---------------------------------------------------------------------------------------
unit_title() {
    case "$1" in
        h2)        echo "HTTP/2 over TLS (h2load -t1 -c$H2_CONNS -m$H2_STREAMS)" ;;
        close)     echo "new TCP connection per request (wrk -c$CONNECTIONS, Connection: close, plain HTTP)" ;;
        close-tls) echo "new TLS connection per request, client resumes (wrk -c$CONNECTIONS, Connection: close, HTTPS)" ;;
        resume)    echo "TLS resumption (openssl s_time -reuse; TLS 1.3)" ;;
        resume12)  echo "TLS 1.2 resumption (openssl s_time -reuse -tls1_2)" ;;
        full-tls)  echo "full TLS handshake (openssl s_time -new)" ;;
        big)       echo "$(size_label "$BIG_BYTES") responses, keep-alive (wrk -c$CONNECTIONS, /big)" ;;
        ka-*)      echo "plain HTTP/1.1 keep-alive, ${1#ka-} connections (wrk -c${1#ka-})" ;;
    esac
}
size_label() {
    if [ $(($1 % 1048576)) -eq 0 ]; then echo "$(($1 / 1048576)) MiB"
    elif [ $(($1 % 1024)) -eq 0 ]; then echo "$(($1 / 1024)) KiB"
    else echo "$1-byte"; fi
}
unit_per() { case "$1" in resume|resume12|full-tls) echo connection ;; *) echo request ;; esac; }
unit_rate() { case "$1" in resume|resume12|full-tls) echo "conn/s" ;; *) echo "req/s" ;; esac; }
unit_extra() { case "$1" in big) echo "CPU µs/MiB" ;; resume|resume12|full-tls) echo "% resumed" ;; *) echo "" ;; esac; }

# unit_checks UNIT -> lines "METRIC AGAINST OP BOUND ITEM": METRIC cpu | rate | mib; AGAINST
# nginx | haproxy | best (per round, the better of nginx and HAProxy); ITEM: #16's item.
unit_checks() {
    case "$1" in
        h2)        echo "cpu best <= 1.00 1"; echo "rate best >= 1.00 1" ;;
        resume|resume12) echo "cpu nginx <= 1.00 2" ;;
        close|close-tls) echo "cpu nginx <= 1.00 3" ;;
        full-tls)  echo "cpu nginx < 1.00 3" ;;
        big)       echo "mib haproxy <= 1.00 5" ;;
        ka-*)      echo "cpu nginx <= 0.90 6" ;;
    esac
}

# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
declare -A V_CPU V_RATE V_EXTRA V_PCT V_OTHER V_NOTE ROUNDS_OF READY_NOTE TLS_OF
NOISY_RUNS=0
ROUNDS_DONE=0
STOPPED_EARLY=""

# record UNIT PROXY ROUND: appends this run's figures to the unit's per-round lists.
record() {
    local k="$1/$2" r="$3"
    V_CPU[$k]="${V_CPU[$k]:+${V_CPU[$k]} }$U_CPU"
    V_RATE[$k]="${V_RATE[$k]:+${V_RATE[$k]} }$U_RATE"
    V_EXTRA[$k]="${V_EXTRA[$k]:+${V_EXTRA[$k]} }$U_EXTRA"
    V_PCT[$k]="${V_PCT[$k]:+${V_PCT[$k]} }$M_PROXY_PCT"
    V_OTHER[$k]="${V_OTHER[$k]:+${V_OTHER[$k]} }$M_OTHER_PCT"
    [ "$M_NOISY" -eq 1 ] && { NOISY_RUNS=$((NOISY_RUNS + 1)); U_NOTE="${U_NOTE}NOISY: other load $M_OTHER_PCT%; "; }
    [ -z "$U_NOTE" ] || V_NOTE[$k]="${V_NOTE[$k]:-}round $r: ${U_NOTE% }<br>"
    return 0
}

# check_ready: what the shapes need beyond bench/lib.sh's readiness checks (h2 by ALPN,
# /big's size); a failure is noted in the report (its runs will show it too), not fatal.
check_ready() {
    local p got
    for p in "${PROXIES[@]}"; do
        use_proxy "$p"
        if has_unit h2 && curl -V 2>/dev/null | grep -qw HTTP2; then
            got="$(curl -sk --http2 --max-time 5 -o /dev/null -w '%{http_version}' -H "Host: $HOST_HEADER" \
                "https://127.0.0.1:$PROXY_HTTPS/" 2>/dev/null || true)"
            [ "$got" = 2 ] || READY_NOTE[$p]="${READY_NOTE[$p]:-}curl --http2 got HTTP/${got:-none}, not h2; "
        fi
        # "New, TLSv1.3, Cipher is ..." (the session block, with "Protocol :", can come only
        # with a TLS 1.3 ticket, after s_client has left).
        TLS_OF[$p]="$(timeout 5 openssl s_client -connect "127.0.0.1:$PROXY_HTTPS" </dev/null 2>/dev/null \
            | awk -F', ' '/^New, / { print $2; exit }')"
        if has_unit big; then
            got="$(curl -s --max-time 10 -o /dev/null -w '%{http_code} %{size_download}' -H "Host: $HOST_HEADER" \
                "http://127.0.0.1:$PROXY_HTTP/big" 2>/dev/null || true)"
            [ "$got" = "200 $BIG_BYTES" ] || READY_NOTE[$p]="${READY_NOTE[$p]:-}/big answered '$got', not '200 $BIG_BYTES'; "
        fi
        [ -z "${READY_NOTE[$p]:-}" ] || log "WARNING $p: ${READY_NOTE[$p]}"
    done
}

# The proxies in round R's order (rotated by one each round).
round_order() {
    local r="$1" n="${#PROXIES[@]}" i
    for ((i = 0; i < n; i++)); do echo "${PROXIES[$(( (i + r - 1) % n ))]}"; done
}

past_deadline() { [ "$(date +%s)" -ge "$DEADLINE" ]; }

run_all() {
    local p u r extra
    if [ "$WARMUP" -gt 0 ]; then
        for p in "${PROXIES[@]}"; do
            use_proxy "$p"
            for u in "${UNITS[@]}"; do
                past_deadline && break 2
                log "$u/$p: warm-up ${WARMUP}s"
                run_unit "$p" "$u" "$TMP/warm-$u-$p.txt" "$WARMUP"
                [ -z "$U_NOTE" ] || log "WARNING $u/$p warm-up: $U_NOTE"
            done
        done
    fi
    for r in $(seq 1 "$RUNS"); do
        if past_deadline; then STOPPED_EARLY="BENCH_MAX_SECONDS ($MAX_SECONDS s) reached before round $r"; break; fi
        for u in "${UNITS[@]}"; do
            if past_deadline; then STOPPED_EARLY="BENCH_MAX_SECONDS ($MAX_SECONDS s) reached in round $r, before $u"; break 2; fi
            for p in $(round_order "$r"); do
                use_proxy "$p"
                run_unit "$p" "$u" "$TMP/$u-$p-$r.txt" "$DURATION"
                extra=""
                [ -z "$(unit_extra "$u")" ] || extra="$(unit_extra "$u") $U_EXTRA, "
                log "$u/$p round $r/$RUNS: $U_CPU µs CPU/$(unit_per "$u"), $U_RATE $(unit_rate "$u")," \
                    "${extra}proxy CPU $M_PROXY_PCT%, other load $M_OTHER_PCT%"
                [ -z "$U_NOTE" ] || log "WARNING $u/$p round $r: $U_NOTE"
                record "$u" "$p" "$r"
            done
            ROUNDS_OF[$u]=$(( ${ROUNDS_OF[$u]:-0} + 1 ))
        done
        ROUNDS_DONE="$r"
    done
    [ -z "$STOPPED_EARLY" ] || log "WARNING: $STOPPED_EARLY; the report covers the rounds done"
}

# ---------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------
BUSY_BEFORE="$(machine_busy_pct 2)"
if [ "$BUSY_BEFORE" -gt 10 ]; then
    log "WARNING: the machine is already ${BUSY_BEFORE}% busy before the benchmark (other processes," \
        "maybe in other containers): numbers will be low and noisy"
fi
est=$(( ${#UNITS[@]} * ${#PROXIES[@]} * ( (DURATION + 2) * RUNS + (WARMUP > 0 ? WARMUP + 2 : 0) ) + 30 ))
log "temp dir $TMP; CPUs: client+origin=$CPU_LOAD proxy=$CPU_PROXY; units: ${UNITS[*]};" \
    "$RUNS rounds x ${DURATION}s; about $((est / 60 + 1)) min (stops starting rounds after ${MAX_SECONDS}s)"
START_TS="$(date +%s)"
DEADLINE=$(( START_TS + MAX_SECONDS ))
start_origin
start_all_proxies
check_ready
run_all
stop_all_proxies
ELAPSED=$(( $(date +%s) - START_TS ))

# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
collect_versions
H2LOAD_VER="$( (h2load --version 2>/dev/null || true) | head -n1)"
H2LOAD_VER="${H2LOAD_VER:-h2load not used}"
OPENSSL_VER="$(openssl version 2>/dev/null || true)"

# values UNIT METRIC PROXY -> the per-round list
values() {
    case "$2" in
        cpu) echo "${V_CPU[$1/$3]:-}" ;;
        rate) echo "${V_RATE[$1/$3]:-}" ;;
        mib) echo "${V_EXTRA[$1/$3]:-}" ;;
    esac
}

# versus UNIT METRIC AGAINST -> "MEDIAN LIST" of pingora-vhost's figure over AGAINST's, per round
versus() {
    local u="$1" m="$2" a="$3" mine other how=min
    mine="$(values "$u" "$m" pingora-vhost)"
    if [ "$a" = best ]; then
        [ "$m" = rate ] && how=max
        other="$(list_pick "$how" "$(values "$u" "$m" nginx)" "$(values "$u" "$m" haproxy)")"
    else
        other="$(values "$u" "$m" "$a")"
    fi
    median_of_ratios "$mine" "$other"
}

metric_label() {
    case "$1" in
        cpu) echo "CPU µs/$(unit_per "$2")" ;;
        rate) unit_rate "$2" ;;
        mib) echo "CPU µs/MiB" ;;
    esac
}
against_label() {
    case "$1" in best) echo "the better of nginx and HAProxy" ;; *) echo "$1" ;; esac
}

# Summary table: one row per #16 target (with all three proxies), else the baselines' figures.
summary() {
    local u m a op bound item med list p cells ok fmt
    if [ "$ALL3" -eq 1 ]; then
        echo "| #16 | shape | figure | $(printf '%s | ' "${PROXIES[@]}")pingora-vhost / | median of per-round ratios | per round | target | verdict |"
        echo "|---|---|---|$(printf -- '---:|%.0s' "${PROXIES[@]}")---|---:|---|---|---|"
    else
        echo "Verdicts need nginx, HAProxy and pingora-vhost; this run had: ${PROXIES[*]}."
        echo
        echo "| #16 | shape | figure | $(printf '%s | ' "${PROXIES[@]}")"
        echo "|---|---|---|$(printf -- '---:|%.0s' "${PROXIES[@]}")"
    fi
    for u in "${UNITS[@]}"; do
        while read -r m a op bound item; do
            [ -n "$m" ] || continue
            cells=""
            fmt="%.2f"; [ "$m" = rate ] && fmt="%.0f"
            for p in "${PROXIES[@]}"; do cells="$cells $(list_median "$(values "$u" "$m" "$p")" "$fmt") |"; done
            if [ "$ALL3" -eq 1 ]; then
                read -r med list <<< "$(versus "$u" "$m" "$a")"
                ok="$(meets "$med" "$op" "$bound")"
                echo "| $item | $(unit_title "$u") | $(metric_label "$m" "$u") |$cells $(against_label "$a") | $med | $list | $op $bound | $(verdict "$ok") |"
            else
                echo "| $item | $(unit_title "$u") | $(metric_label "$m" "$u") |$cells"
            fi
        done <<< "$(unit_checks "$u")"
    done
    echo
    echo "Proxy columns: each proxy's median over the rounds. Ratios: pingora-vhost's figure over the other's measured in the same round (seconds apart), median over the rounds."
}

# unit_section UNIT: every round's figures, then the ratios to each baseline.
unit_section() {
    local u="$1" p r extra i cpu rate ex pct oth med list
    extra="$(unit_extra "$u")"
    echo "### $(unit_title "$u")"
    echo
    echo "| round | proxy | CPU µs/$(unit_per "$u") | $(unit_rate "$u") |${extra:+ $extra |} proxy CPU % | other load % |"
    echo "|---|---|---:|---:|${extra:+---:|}---:|---:|"
    for r in $(seq 1 "${ROUNDS_OF[$u]:-0}"); do
        for p in "${PROXIES[@]}"; do
            i="$r"
            cpu="$(echo "${V_CPU[$u/$p]:-}" | awk -v i="$i" '{ print $i }')"
            rate="$(echo "${V_RATE[$u/$p]:-}" | awk -v i="$i" '{ print $i }')"
            ex="$(echo "${V_EXTRA[$u/$p]:-}" | awk -v i="$i" '{ print $i }')"
            pct="$(echo "${V_PCT[$u/$p]:-}" | awk -v i="$i" '{ print $i }')"
            oth="$(echo "${V_OTHER[$u/$p]:-}" | awk -v i="$i" '{ print $i }')"
            echo "| $r | $p | $cpu | $rate |${extra:+ $ex |} $pct | $oth |"
        done
    done
    echo
    if [ "$ALL3" -eq 1 ]; then
        for m in cpu rate $([ "$u" = big ] && echo mib); do
            for a in nginx haproxy best; do
                read -r med list <<< "$(versus "$u" "$m" "$a")"
                echo "- $(metric_label "$m" "$u"), pingora-vhost / $(against_label "$a"): median **$med** (rounds: $list)"
            done
        done
    fi
    echo
    for p in "${PROXIES[@]}"; do
        [ -z "${V_NOTE[$u/$p]:-}" ] || echo "- notes, $p: ${V_NOTE[$u/$p]%<br>}"
    done
}

report() {
    local p
    echo "# pingora-vhost traffic shapes (issue #16)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); command: \`bench/shapes.sh\` with BENCH_SHAPES=$SHAPES, $RUNS rounds x ${DURATION}s, warm-up ${WARMUP}s; $ROUNDS_DONE round(s) done in $((ELAPSED / 60)) min${STOPPED_EARLY:+ — **stopped early: $STOPPED_EARLY**}"
    echo "- machine: $(nproc) CPUs ($CPU_MODEL), kernel $(uname -r); net.ipv4.tcp_tw_reuse=$(cat /proc/sys/net/ipv4/tcp_tw_reuse 2>/dev/null || echo '?'), ports $(tr '\t' '-' < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo '?')"
    echo "- pinning: client + origin on CPU $CPU_LOAD, proxy on CPU $CPU_PROXY; the proxies not being measured are paused (SIGSTOP)"
    echo "- proxies (1 worker each): nginx $NGINX_VER, HAProxy $HAPROXY_VER, $PV_VER; h2 by ALPN on the TLS listener (nginx \`http2\`, HAProxy \`alpn h2,http/1.1\`); TLS session settings: each proxy's defaults; origin connections kept: nginx \`keepalive $UPSTREAM_POOL\`, HAProxy \`pool-max-conn $UPSTREAM_POOL\`, pingora-vhost up to 1024 per address"
    echo "- TLS version a default client (openssl s_client) gets: $(for p in "${PROXIES[@]}"; do printf '%s %s; ' "$p" "${TLS_OF[$p]:-?}"; done)"
    echo "- clients: wrk $WRK_VER (1 thread), $H2LOAD_VER, $OPENSSL_VER (s_time; each connection sends one HTTP/1.1 request with Connection: close)"
    echo "- origin: nginx, 1 worker, \`return 200 \"ok\\n\"\`$(has_unit big && echo "; /big: a static file of $ORIGIN_BIG_BYTES bytes")"
    echo "- other load: machine ${BUSY_BEFORE}% busy just before the run; $NOISY_RUNS run(s) with more than 10 % of the machine used by other processes$( { [ "$BUSY_BEFORE" -gt 10 ] || [ "$NOISY_RUNS" -gt 0 ]; } && echo ' — **the machine was not idle: numbers are noisy**')"
    echo "- CPU µs per request / connection: the proxy's utime+stime (all its processes and threads) during the client's run / requests or connections the client completed"
    for p in "${PROXIES[@]}"; do
        [ -z "${READY_NOTE[$p]:-}" ] || echo "- **$p before the runs**: ${READY_NOTE[$p]}"
    done
    echo
    echo "## Summary"
    echo
    summary
    echo
    echo "## Per shape"
    echo
    for u in "${UNITS[@]}"; do unit_section "$u"; echo; done
}

mkdir -p "$(dirname "$RESULTS_MD")"
report > "$RESULTS_MD"
echo
summary
echo
if [ "$BUSY_BEFORE" -gt 10 ] || [ "$NOISY_RUNS" -gt 0 ]; then
    log "WARNING: other processes used the CPUs (${BUSY_BEFORE}% busy before the run; $NOISY_RUNS run(s) marked NOISY):" \
        "treat these numbers as noisy and re-run on an idle machine"
fi
log "results written to $RESULTS_MD"

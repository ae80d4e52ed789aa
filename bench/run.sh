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
BENCH_PROG=run.sh
# shellcheck source=bench/lib.sh
. "$SCRIPT_DIR/lib.sh"

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

usage() { bench_usage "${BASH_SOURCE[0]}"; }

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

require_uints DURATION WARMUP RUNS CONNECTIONS PORT_BASE
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

require_root

need_base_tools
# Enough file descriptors for CONNECTIONS client + upstream connections in each proxy, and
# the idle connections of the memory measurement.
raise_fd_limit $(( CONNECTIONS * 2 + IDLE_CONNS + 1024 ))

# Build pingora-vhost (or only check the binary with --skip-build).
if [ "$RUN_PV" -eq 1 ]; then ensure_pv_binary "$SKIP_BUILD"; fi

# CPU pinning: wrk + origin on one CPU, the proxy under test alone on another.
setup_pinning
# Temp dir; everything started is killed on exit.
bench_tmp_init

# ---------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------
take_base_ports
take_port NGINXL_HTTP;  take_port NGINXL_HTTPS
take_port PVL_HTTP; take_port PVL_HTTPS; take_port PVL_API; take_port PVL_RPC; take_port PVL_GOSSIP
take_port ORIGIN_TLS_PORT
take_port NGINXT_HTTP; take_port NGINXT_HTTPS
take_port PVT_HTTP; take_port PVT_HTTPS; take_port PVT_API; take_port PVT_RPC; take_port PVT_GOSSIP
take_port PVF_HTTP; take_port PVF_HTTPS; take_port PVF_API; take_port PVF_RPC; take_port PVF_GOSSIP
take_port PVF_FRONT_HTTP; take_port PVF_FRONT_HTTPS
take_port PVP_HTTP; take_port PVP_HTTPS; take_port PVP_API; take_port PVP_RPC; take_port PVP_GOSSIP
take_port PVP_FRONT_HTTP; take_port PVP_FRONT_HTTPS

make_cert

# ---------------------------------------------------------------------------------------
# Proxies beyond nginx, HAProxy and pingora-vhost (bench/lib.sh). Each start_* sets
# PROXY_PID, PROXY_HTTP, PROXY_HTTPS.
# ---------------------------------------------------------------------------------------
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
        echo "    no strict-limits"
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

# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
declare -A RPS P50 P99 CPU_US CPU_PCT ORIGIN_PCT OTHER_PCT REQS NOTES NOISY BEST_RAW ALL_RPS
NOISY_RUNS=0

# run_once NAME PROTO URL RAW: one measured wrk run; sets the R_* globals.
run_once() {
    local name="$1" proto="$2" url="$3" raw="$4" key="$1/$2"
    measure_client "$name" "$raw" $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
        -H "Host: $HOST_HEADER" "$url"
    [ "$M_RC" -eq 0 ] || { cat "$raw" >&2; die "$key: wrk failed"; }
    parse_wrk "$raw"
    [ -n "$W_REQS" ] && [ -n "$W_RPS" ] && [ -n "$W_P50" ] && [ -n "$W_P99" ] \
        || { cat "$raw" >&2; die "$key: could not parse wrk output"; }
    [ "$W_REQS" -gt 0 ] || { cat "$raw" >&2; die "$key: wrk completed no request"; }

    R_REQS="$W_REQS"
    R_RPS="$(awk -v r="$W_RPS" 'BEGIN { printf "%.0f", r }')"
    R_P50="$(to_ms "$W_P50")"
    R_P99="$(to_ms "$W_P99")"
    R_CPU_US="$(cpu_us "$M_TICKS" "$W_REQS")"
    R_CPU_PCT="$M_PROXY_PCT"
    R_ORIGIN_PCT="$M_ORIGIN_PCT"
    # CPU used on this machine by anything but the proxy, the origin and wrk, as % of all CPUs.
    R_OTHER_PCT="$M_OTHER_PCT"
    R_NOISY="$M_NOISY"
    R_NOTE=""
    [ "$R_NOISY" -eq 1 ] && R_NOTE="NOISY: other load ${R_OTHER_PCT}% of the machine; "
    R_ERRORS=""
    [ -n "$W_NON2XX" ] && R_ERRORS="${R_ERRORS}non-2xx/3xx: $W_NON2XX; "
    [ -n "$W_SOCKERR" ] && R_ERRORS="${R_ERRORS}socket errors: $W_SOCKERR; "
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

declare -A ERRORS_OF ALL_CPU BEST_NOTE

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
collect_versions

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
    local proto="$1" cpu_med cpu_list rps_med rps_list best
    best="$(list_pick max "${ALL_RPS[nginx/$proto]}" "${ALL_RPS[haproxy/$proto]}")"
    read -r cpu_med cpu_list <<< "$(median_of_ratios "${ALL_CPU[pingora-vhost/$proto]}" "${ALL_CPU[nginx/$proto]}")"
    read -r rps_med rps_list <<< "$(median_of_ratios "${ALL_RPS[pingora-vhost/$proto]}" "$best")"
    echo "$cpu_med $rps_med $cpu_list|$rps_list"
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
paired_median() { median_of_ratios "${ALL_CPU[$1/$3]}" "${ALL_CPU[$2/$3]}"; }

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
paired_rps_median() { median_of_ratios "${ALL_RPS[$1/$3]}" "${ALL_RPS[$2/$3]}"; }

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

#!/usr/bin/env bash
# Per-request cost of a node whose traffic touches many domains and backends (#15: "routing
# lookup cost independent of the number of domains"), beside nginx routing the same domains.
# One proxy at a time pinned to CPU 1, nginx as the origin and wrk on CPU 0; interleaved
# rounds; prints CPU µs per request and req/s for each row, and per round the ratios to the
# 10-domain row of the same proxy:
#   pingora-vhost: 10 domains; 100,000 domains on 10 backends with Host over 10 of them (the
#   table's size alone) and over all of them (every request a different domain); 100,000
#   domains on 100,000 backends with Host over all of them.
#   nginx: 10 server blocks; 100,000 server blocks (the same 10 upstreams, keepalive 64), Host
#   over 10 of them and over all of them.
# Bounded (about 3 minutes a round).
#
#   bench/hot_domains/run.sh [path/to/pingora-vhost]    (as root; needs nginx, wrk, taskset)
#   HOT_ROUNDS=3  HOT_SECONDS=8
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${1:-$HERE/../../target/release/pingora-vhost}"
ROUNDS="${HOT_ROUNDS:-3}"
SECS="${HOT_SECONDS:-8}"
W="$(mktemp -d /tmp/hot-domains.XXXXXX)"
ORIGIN=127.0.0.1:19500
cleanup() {
    pkill -f "$W/" 2>/dev/null || true
    for p in "$W"/*.pid; do [ -f "$p" ] && kill "$(cat "$p" 2>/dev/null)" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
cat > "$W/origin.conf" <<NGX
worker_processes 1; daemon off; pid $W/origin.pid; error_log $W/origin-error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN; location / { return 200 "ok\n"; } } }
NGX
taskset -c 0 nginx -c "$W/origin.conf" -p "$W" &
python3 "$HERE/gen_config.py" 10 10 "$ORIGIN" "$W/small.toml"
python3 "$HERE/gen_config.py" 100000 100000 "$ORIGIN" "$W/big.toml"
python3 "$HERE/gen_config.py" 100000 10 "$ORIGIN" "$W/bigdom.toml"
sed -i "s#/tmp/prof/#$W/#" "$W"/*.toml
python3 "$HERE/gen_lua.py" 10 "$W/h10.lua"
python3 "$HERE/gen_lua.py" 100000 "$W/h100k.lua"
# nginx as the proxy: one server block per domain, domain i on upstream t(i % 10).
gen_nginx() { # gen_nginx N OUT
    python3 - "$1" "$2" "$W" "$ORIGIN" <<'PY'
import sys
n, out, w, origin = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with open(out, "w") as f:
    f.write(f"worker_processes 1; daemon off; pid {w}/proxy.pid; error_log {w}/proxy-error.log;\n"
            "events { worker_connections 4096; }\n"
            "http { access_log off; keepalive_requests 1000000;\n"
            "  server_names_hash_max_size 262144; server_names_hash_bucket_size 128;\n")
    for t in range(10):
        f.write(f"  upstream t{t} {{ server {origin}; keepalive 64; }}\n")
    for i in range(n):
        f.write(f"  server {{ listen 127.0.0.1:19080; server_name h{i}.bench; location / {{ "
                f"proxy_pass http://t{i % 10}; proxy_http_version 1.1; "
                "proxy_set_header Connection \"\"; } }\n")
    f.write("}\n")
PY
}
gen_nginx 10 "$W/nginx-small.conf"
gen_nginx 100000 "$W/nginx-big.conf"

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# measure PID LUA: prints "CPU_US_PER_REQ REQ_PER_S" for the processes PID and its children
measure() {
    local pid=$1 lua=$2 a b out rps kids
    kids() { echo "$pid $(pgrep -P "$pid" || true)"; }
    sum() { local t=0 p; for p in $(kids); do t=$((t + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done; echo $t; }
    taskset -c 0 wrk -t1 -c50 -d2s -s "$W/$lua" http://127.0.0.1:19080/ > /dev/null
    a=$(sum)
    out=$(taskset -c 0 wrk -t1 -c50 -d"${SECS}s" -s "$W/$lua" http://127.0.0.1:19080/)
    b=$(sum)
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    awk -v d=$((b - a)) -v r="$rps" -v s="$SECS" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%.2f %.0f", d * 1e6 / hz / (r * s), r }'
}
wait_served() {
    local i
    for i in $(seq 1 600); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: h9.bench' http://127.0.0.1:19080/ || true)" = 200 ] && return 0
        sleep 0.2
    done
    echo "not serving after 120 s" >&2; return 1
}
pv_rows() { # pv_rows CONFIG LUA...
    local cfg=$1; shift
    rm -rf "$W"/data-*
    taskset -c 1 "$BIN" --config "$W/$cfg" > "$W/pv.out" 2> "$W/pv.err" &
    local pid=$! lua
    wait_served; sleep 3
    for lua in "$@"; do echo "pingora-vhost $cfg $lua $(measure $pid "$lua")"; done
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
nginx_rows() { # nginx_rows CONF LUA...
    local conf=$1; shift
    taskset -c 1 nginx -c "$W/$conf" -p "$W" &
    local pid=$! lua
    wait_served; sleep 1
    for lua in "$@"; do echo "nginx $conf $lua $(measure $pid "$lua")"; done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    sleep 1
}
RAW="$W/raw"
for r in $(seq 1 "$ROUNDS"); do
    {
        pv_rows small.toml h10.lua
        nginx_rows nginx-small.conf h10.lua
        pv_rows bigdom.toml h10.lua h100k.lua
        nginx_rows nginx-big.conf h10.lua h100k.lua
        pv_rows big.toml h100k.lua
    } | sed "s/^/$r /" | tee -a "$RAW" >&2
done
echo
echo "| proxy | config | Host over | CPU µs/req (rounds) | req/s (rounds) |"
echo "|---|---|---|---|---|"
awk '{ k = $2 " | " $3 " | " $4; if (!(k in seen)) { order[++n] = k; seen[k] = 1 }
       cpu[k] = cpu[k] (cpu[k] == "" ? "" : ", ") $5; rps[k] = rps[k] (rps[k] == "" ? "" : ", ") $6 }
     END { for (i = 1; i <= n; i++) print "| " order[i] " | " cpu[order[i]] " | " rps[order[i]] " |" }' "$RAW"
echo
echo "Per-round CPU/request ratios to the same proxy's 10-domain row (median of rounds):"
awk '{ v[$1, $2 " " $3 " " $4] = $5; rounds[$1] = 1 }
     END {
       split("pingora-vhost bigdom.toml h10.lua|pingora-vhost bigdom.toml h100k.lua|pingora-vhost big.toml h100k.lua|nginx nginx-big.conf h10.lua|nginx nginx-big.conf h100k.lua", rows, "|")
       for (i = 1; i <= 5; i++) {
         row = rows[i]; base = (row ~ /^nginx/) ? "nginx nginx-small.conf h10.lua" : "pingora-vhost small.toml h10.lua"
         m = 0; line = ""
         for (r in rounds) if ((r, base) in v && (r, row) in v && v[r, base] > 0) { x[++m] = v[r, row] / v[r, base]; line = line sprintf(" %.2f", x[m]) }
         # median
         for (a = 1; a <= m; a++) for (b = a + 1; b <= m; b++) if (x[b] < x[a]) { t = x[a]; x[a] = x[b]; x[b] = t }
         med = (m % 2) ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2
         printf "- %s: %.2fx (rounds:%s)\n", row, med, line
       }
     }' "$RAW"

#!/usr/bin/env bash
# Per-request cost of a node whose traffic touches many domains and backends at random
# (#15: "routing lookup cost independent of the number of domains"). One release node pinned
# to CPU 1, nginx as the origin and wrk on CPU 0; prints CPU µs per request and req/s for:
# 10 domains; 100,000 domains + backends with Host over 10 of them; 100,000 domains on 10
# backends and on 100,000 backends with Host over all of them. Bounded (about 2 minutes).
#
#   bench/hot_domains/run.sh [path/to/pingora-vhost]    (as root; needs nginx, wrk, taskset)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${1:-$HERE/../../target/release/pingora-vhost}"
W="$(mktemp -d /tmp/hot-domains.XXXXXX)"
ORIGIN=127.0.0.1:19500
cleanup() { pkill -f "$W/" 2>/dev/null || true; [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
cat > "$W/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/nginx-error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $ORIGIN; location / { return 200 "ok\n"; } } }
NGX
taskset -c 0 nginx -c "$W/nginx.conf" -p "$W" &
python3 "$HERE/gen_config.py" 10 10 "$ORIGIN" "$W/small.toml"
python3 "$HERE/gen_config.py" 100000 100000 "$ORIGIN" "$W/big.toml"
python3 "$HERE/gen_config.py" 100000 10 "$ORIGIN" "$W/bigdom.toml"
sed -i "s#/tmp/prof/#$W/#" "$W"/*.toml
python3 "$HERE/gen_lua.py" 10 "$W/h10.lua"
python3 "$HERE/gen_lua.py" 100000 "$W/h100k.lua"
one() { # one CONFIG LUA
    rm -rf "$W"/data-*
    taskset -c 1 "$BIN" --config "$W/$1" > "$W/pv.out" 2> "$W/pv.err" &
    local pid=$! i a b out rps
    for i in $(seq 1 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: h9.bench' http://127.0.0.1:19080/ || true)" = 200 ] && break
        sleep 0.2
    done
    sleep 3
    taskset -c 0 wrk -t1 -c50 -d2s -s "$W/$2" http://127.0.0.1:19080/ > /dev/null
    a=$(awk '{print $14+$15}' /proc/$pid/stat)
    out=$(taskset -c 0 wrk -t1 -c50 -d8s -s "$W/$2" http://127.0.0.1:19080/)
    b=$(awk '{print $14+$15}' /proc/$pid/stat)
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    echo "| $1 | $2 | $(awk -v d=$((b - a)) -v r="$rps" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", d * 1e6 / hz / (r * 8) }') | $rps |"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
echo "| config | Host over | CPU µs/req | req/s |"
echo "|---|---|---:|---:|"
one small.toml h10.lua
one big.toml h10.lua
one bigdom.toml h100k.lua
one big.toml h100k.lua

#!/usr/bin/env bash
# Two pingora-vhost binaries, back to back, on the new-connection-per-request shape: the
# A/B used when a change is too small for the spread between bench/shapes.sh runs.
#
#   BENCH_KEEP_TMP=1 BENCH_SHAPES=close BENCH_RUNS=1 BENCH_DURATION=2 \
#       bench/shapes.sh --skip-build --only pingora-vhost      # leaves /tmp/pv-bench.XXXXXX
#   bench/ab_close.sh /tmp/pv-bench.XXXXXX ROUNDS SECONDS http|https BIN_A BIN_B
#
# Uses the kept temp dir's origin (nginx, CPU 0) and pingora-vhost config; each round starts
# each binary on CPU 1 (order alternating by round), waits for the first answer and 11 s (the
# cluster's first ticket key), warms up 2 s, then measures the node's utime+stime over a
# wrk -t1 -c50 run with `Connection: close` (wrk on CPU 0). Prints one line per run:
# binary, CPU µs per request, requests. Compare the pairs of a round.
set -u
D="$1"; ROUNDS="$2"; SECS="$3"; SCHEME="$4"; A="$5"; B="$6"
CLK=$(getconf CLK_TCK)
PORT_HTTP=$(grep '^listen_addr_http' $D/pingora-vhost/config.toml | sed 's/.*:\([0-9]*\)"/\1/')
PORT_HTTPS=$(grep '^listen_addr =' $D/pingora-vhost/config.toml | sed 's/.*:\([0-9]*\)"/\1/')
PORT=$PORT_HTTP; [ "$SCHEME" = https ] && PORT=$PORT_HTTPS
ulimit -n "$(ulimit -Hn)"
taskset -c 0 nginx -c $D/origin/nginx.conf >/dev/null 2>&1 &
ORIGIN=$!
sleep 1
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
one() {
  local bin="$1"
  setsid taskset -c 1 "$bin" --config $D/pingora-vhost/config.toml >"$D/ab-node.log" 2>&1 &
  local pid=$!
  for i in $(seq 100); do curl -sk -o /dev/null -H 'Host: bench.local' $SCHEME://127.0.0.1:$PORT/ && break; sleep 0.2; done
  sleep 11   # ticket key in place
  taskset -c 0 wrk -t1 -c50 -d2s -H 'Host: bench.local' -H 'Connection: close' $SCHEME://127.0.0.1:$PORT/ >/dev/null
  local t0=$(ticks $pid)
  local out=$(taskset -c 0 wrk -t1 -c50 -d${SECS}s -H 'Host: bench.local' -H 'Connection: close' $SCHEME://127.0.0.1:$PORT/)
  local t1=$(ticks $pid)
  local reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  kill $pid; wait $pid 2>/dev/null
  awk -v t=$((t1-t0)) -v r=$reqs -v c=$CLK -v b="$(basename $bin)" 'BEGIN { printf "%s %.2f us/req %d req\n", b, t*1e6/c/r, r }'
}
for r in $(seq $ROUNDS); do
  if [ $((r % 2)) = 1 ]; then one $A; one $B; else one $B; one $A; fi
done
kill $ORIGIN

#!/usr/bin/env bash
# End-to-end test of the 3-node Docker deploy (deploy/docker-compose.yml), against the real
# Docker Engine: image build, cluster formation, API writes, DNS round-robin through the
# `proxy` alias, loss of the leader, and a rolling restart under client traffic.
#
#   deploy/test.sh            # exit 0 = every check passed; prints a PASS/FAIL summary
#
# Environment:
#   PROJECT        compose project name (default pvtest)
#   TEST_TIMEOUT   overall bound in seconds, image build included (default 1200)
#   KEEP=1         leave the cluster and helper containers running afterwards (debugging)
#   REMOVE_IMAGE=1 also remove the image pingora-vhost:local at the end (default: kept; it is
#                  content-addressed, so the next run reuses it when nothing changed)
#
# Cleanup (trap on exit, also after a failure or a timeout): the helper containers, then
# `compose down -v` (the node containers, their volumes and the network). Runs are serialized
# with a lock file, so two runs on one machine do not fight over names and the subnet.
set -euo pipefail

DEPLOY="$(cd "$(dirname "$0")" && pwd)"
PROJECT="${PROJECT:-pvtest}"
TEST_TIMEOUT="${TEST_TIMEOUT:-1200}"
IMAGE="${PINGORA_VHOST_IMAGE:-pingora-vhost:local}"
export PINGORA_VHOST_IMAGE="$IMAGE"
TOKEN="$(sed -n 's/^token *= *"\(.*\)"/\1/p' "$DEPLOY/node1.toml")"
NET="${PROJECT}_cluster"
BACKEND="${PROJECT}-backend"
CLIENT="${PROJECT}-client"
BODY="hello from the backend container"
NODES=(1 2 3)

START=$SECONDS
failures=0
aborted=""
results=()
declare -A IP CID

say() { echo "[$(date +%T) +$((SECONDS - START))s] $*"; }
pass() { results+=("PASS  $*"); say "PASS: $*"; }
fail() { results+=("FAIL  $*"); say "FAIL: $*"; failures=$((failures + 1)); }
abort() { aborted="$*"; results+=("FAIL  $* (test stopped here)"); say "FAIL: $*"; exit 1; }
info() { results+=("      $*"); say "$*"; }

# --- cleanup, diagnostics, summary ---------------------------------------------------------
WATCHDOG=""
finish() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$WATCHDOG" ]; then
    pkill -P "$WATCHDOG" sleep 2>/dev/null
    kill "$WATCHDOG" 2>/dev/null
  fi
  if [ "$rc" -ne 0 ] || [ "$failures" -gt 0 ]; then
    echo "---- diagnostics ----"
    for n in "${NODES[@]}"; do
      [ -n "${CID[$n]:-}" ] || continue
      echo "== node$n: $(docker inspect -f '{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}}' "${CID[$n]}" 2>&1)"
      docker logs --tail 25 "${CID[$n]}" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -v 'openraft::' | tail -15
    done
    if docker inspect "$CLIENT" >/dev/null 2>&1; then
      echo "== client events"
      docker exec "$CLIENT" sh -c 'cat /tmp/*/events 2>/dev/null | tail -30'
    fi
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    say "KEEP=1: leaving project $PROJECT, $BACKEND and $CLIENT running"
  elif [ -n "${COMPOSE[*]:-}" ]; then
    docker rm -f -v "$CLIENT" "$BACKEND" >/dev/null 2>&1
    dc down -v --remove-orphans -t 5 >/dev/null 2>&1 || say "warning: compose down failed"
    [ "${REMOVE_IMAGE:-0}" = 1 ] && docker image rm "$IMAGE" >/dev/null 2>&1
  fi
  echo
  echo "================ deploy/test.sh summary ================"
  printf '%s\n' "${results[@]}"
  if [ "$rc" -eq 0 ] && [ "$failures" -eq 0 ] && [ -z "$aborted" ]; then
    echo "RESULT: PASS ($((SECONDS - START))s)"
    exit 0
  fi
  echo "RESULT: FAIL ($failures failed check(s)${aborted:+; stopped at: $aborted}; $((SECONDS - START))s)"
  exit 1
}
trap finish EXIT
trap 'aborted="${aborted:-interrupted or overall timeout (${TEST_TIMEOUT}s)}"; exit 1' INT TERM

# --- prerequisites -------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || abort "docker not found: this test needs Docker Engine"
docker info >/dev/null 2>&1 || abort "cannot talk to the Docker daemon (docker info failed)"
if command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  say "installing docker-compose"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; } ||
    abort "neither docker-compose nor 'docker compose' is available"
  COMPOSE=(docker-compose)
fi
dc() { "${COMPOSE[@]}" -p "$PROJECT" -f "$DEPLOY/docker-compose.yml" "$@"; }
command -v flock >/dev/null 2>&1 || abort "flock (util-linux) not found"

exec 9>"${TMPDIR:-/tmp}/pingora-vhost-deploy-test.lock"
if ! flock -n 9; then
  say "another deploy test holds the lock; waiting"
  flock -w 900 9 || abort "waited 900s for another deploy test to finish"
fi
( exec 9>&- </dev/null >/dev/null 2>&1; sleep "$TEST_TIMEOUT"; kill -TERM $$ ) &
WATCHDOG=$!

# --- helpers -------------------------------------------------------------------------------
# Management API calls are made from the client container (busybox wget), so the host needs
# nothing but docker and can be any kind of Docker host. busybox 1.35's `wget -T` crashes,
# hence `timeout`.
api() { # api NODE PATH [JSON-BODY]  -> body on stdout; non-zero on HTTP error
  local ip=${IP[$1]} path=$2
  if [ $# -ge 3 ]; then
    docker exec "$CLIENT" timeout 10 wget -q -O - --header "Authorization: Bearer $TOKEN" \
      --header "Content-Type: application/json" --post-data "$3" "http://$ip:9080$path"
  else
    docker exec "$CLIENT" timeout 10 wget -q -O - --header "Authorization: Bearer $TOKEN" "http://$ip:9080$path"
  fi
}
status() { api "$1" /api/v1/cluster/status 2>/dev/null || true; }
jnum() { printf '%s' "$2" | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2 || true; }
proxy_get() { # proxy_get NODE HOST -> body
  docker exec "$CLIENT" timeout 5 wget -q -O - --header "Host: $2" "http://${IP[$1]}:8080/" 2>/dev/null
}
wait_until() { # wait_until SECS CMD... ; retries CMD every 0.5s
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}
# cluster_ok NODE...: each listed node reports 3 voters and the same leader, which is one of
# the listed nodes, and the same last_applied. Sets LEADER and APPLIED.
cluster_ok() {
  local leader="" applied="" s l a n
  for n in "$@"; do
    s=$(status "$n")
    [ "$(grep -o '"voter":true' <<<"$s" | wc -l)" -eq 3 ] || return 1
    l=$(jnum leader_id "$s"); a=$(jnum last_applied "$s")
    [ -n "$l" ] && [ -n "$a" ] || return 1
    [ -z "$leader" ] && leader=$l && applied=$a
    [ "$l" = "$leader" ] && [ "$a" = "$applied" ] || return 1
  done
  [[ " $* " == *" $leader "* ]] || return 1
  LEADER=$leader APPLIED=$applied
}
serves() { [ "$(proxy_get "$1" "$2")" = "$BODY" ]; }
all_serve() { local h=$1 n; shift; for n in "$@"; do serves "$n" "$h" || return 1; done; }
has_domain() { api "$1" "/api/v1/domains/$2" >/dev/null 2>&1; }
requests_total() { jnum requests_total "$(api "$1" /api/v1/stats 2>/dev/null || true)"; }
loop_stats() { docker exec "$CLIENT" cat "$1/stats" 2>/dev/null || echo "0 0 0 0"; }
run_loop() { # run_loop OUT COUNT -> "total ok retried failed"
  docker exec "$CLIENT" sh /tmp/client-loop.sh proxy app.test "$BODY" "$1" "$2"
  loop_stats "$1"
}

# --- 0. image and cluster ------------------------------------------------------------------
t=$SECONDS
"$DEPLOY/build-image.sh" || abort "deploy/build-image.sh failed"
pass "image $IMAGE built from a local rootfs ($((SECONDS - t))s)"

docker rm -f -v "$CLIENT" "$BACKEND" >/dev/null 2>&1 || true
dc down -v --remove-orphans -t 5 >/dev/null 2>&1 || true

t=$SECONDS
dc up -d || abort "compose up failed"
for n in "${NODES[@]}"; do
  CID[$n]=$(dc ps -q "node$n")
  [ -n "${CID[$n]}" ] || abort "no container for node$n"
  IP[$n]=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "${CID[$n]}")
done
say "nodes: 1=${IP[1]} 2=${IP[2]} 3=${IP[3]}"

docker run -d --name "$BACKEND" --network "$NET" --network-alias backend --read-only --tmpfs /tmp \
  --entrypoint /bin/sh "$IMAGE" -c \
  "mkdir -p /tmp/www && echo '$BODY' >/tmp/www/index.html && echo ok >/tmp/www/health && exec httpd -f -p 8000 -h /tmp/www" \
  >/dev/null || abort "starting the backend container"
docker run -d --name "$CLIENT" --network "$NET" --read-only --tmpfs /tmp \
  --entrypoint /bin/sh "$IMAGE" -c 'trap "exit 0" TERM; while :; do sleep 1; done' \
  >/dev/null || abort "starting the client container"
docker exec -i "$CLIENT" sh -c 'cat >/tmp/client-loop.sh' <"$DEPLOY/client-loop.sh"

wait_until 90 cluster_ok 1 2 3 || abort "cluster did not converge within 90s (3 voters, one leader on every node)"
pass "cluster formed: 3 voters, leader node$LEADER, agreed by all nodes ($((SECONDS - t))s after compose up)"

# --- a. one write through one node, served by all ----------------------------------------
W=$(( LEADER % 3 + 1 ))   # a follower: the write is forwarded to the leader
if api "$W" /api/v1/backends '{"id":"web","address":"backend:8000","tags":["a"]}' >/dev/null &&
   api "$W" /api/v1/domains '{"domain":"app.test","enabled_backends_tag":"a"}' >/dev/null; then
  pass "(a) backend + domain app.test created through node$W's API (a follower)"
else
  abort "(a) creating backend/domain through node$W"
fi
if wait_until 20 all_serve app.test 1 2 3; then
  pass "(a) every node proxies app.test to the backend container"
else
  fail "(a) not every node serves app.test within 20s"
fi

# --- b. DNS round-robin alias ------------------------------------------------------------
records=$(docker exec "$CLIENT" nslookup proxy 2>/dev/null | awk '/^Name:/ {n=1; next} n && /^Address/ {print $2}' | sort | tr '\n' ' ')
if [ "$(wc -w <<<"$records")" -eq 3 ]; then
  pass "(b) 'proxy' resolves to 3 A records: $records"
else
  fail "(b) 'proxy' resolves to: '$records' (want the 3 node addresses)"
fi
declare -A before
for n in "${NODES[@]}"; do r=$(requests_total "$n"); before[$n]=${r:-0}; done
N_ALIAS=60
ok=$(docker exec "$CLIENT" sh -c "ok=0; i=0; while [ \$i -lt $N_ALIAS ]; do i=\$((i+1));
  b=\$(timeout 5 wget -q -O - --header 'Host: app.test' http://proxy:8080/ 2>/dev/null) && [ \"\$b\" = '$BODY' ] && ok=\$((ok+1)); done; echo \$ok")
spread=""
for n in "${NODES[@]}"; do r=$(requests_total "$n"); spread+="node$n=$(( ${r:-0} - ${before[$n]} )) "; done
if [ "$ok" = "$N_ALIAS" ]; then
  pass "(b) $N_ALIAS/$N_ALIAS requests to http://proxy:8080/ answered 200 with the backend's body (served by: $spread)"
else
  fail "(b) only $ok/$N_ALIAS requests through the alias answered 200 with the backend's body (served by: $spread)"
fi

# --- c. loss of the leader ---------------------------------------------------------------
OLD=$LEADER
SURV=(); for n in "${NODES[@]}"; do [ "$n" = "$OLD" ] || SURV+=("$n"); done
docker kill "${CID[$OLD]}" >/dev/null || abort "(c) docker kill node$OLD"
t=$SECONDS
read -r total okc retried failed <<<"$(run_loop /tmp/kill 40)"
if [ "$failed" = 0 ] && [ "$okc" = 40 ]; then
  pass "(c) leader node$OLD killed: $okc/40 client requests succeeded ($retried needed a retry on another address)"
else
  fail "(c) leader node$OLD killed: $failed/$total client requests failed on every address"
fi
new_leader() { cluster_ok "${SURV[@]}" && [ "$LEADER" != "$OLD" ]; }
if wait_until 30 new_leader; then
  pass "(c) new leader node$LEADER elected, seen by both survivors $((SECONDS - t))s after the kill"
else
  abort "(c) no new leader among node${SURV[0]}, node${SURV[1]} within 30s"
fi
OTHER=${SURV[0]}; [ "$OTHER" = "$LEADER" ] && OTHER=${SURV[1]}
if api "$OTHER" /api/v1/backends '{"id":"web-b","address":"backend:8000","tags":["b"]}' >/dev/null &&
   api "$OTHER" /api/v1/domains '{"domain":"after-kill.test","enabled_backends_tag":"a"}' >/dev/null &&
   wait_until 10 all_serve after-kill.test "${SURV[@]}"; then
  pass "(c) write on survivor node$OTHER with node$OLD down: committed and served by both survivors"
else
  fail "(c) write on survivor node$OTHER with node$OLD down"
fi
t=$SECONDS
docker start "${CID[$OLD]}" >/dev/null || abort "(c) docker start node$OLD"
if wait_until 60 cluster_ok 1 2 3 && wait_until 10 all_serve after-kill.test "$OLD"; then
  pass "(c) node$OLD restarted after kill -9: rejoined, last_applied=$APPLIED like the leader, serves the write it missed ($((SECONDS - t))s)"
else
  abort "(c) node$OLD did not rejoin within 60s of docker start"
fi

# --- d. rolling restart under traffic ---------------------------------------------------
docker exec -d "$CLIENT" sh /tmp/client-loop.sh proxy app.test "$BODY" /tmp/rolling 0
sleep 2
t=$SECONDS
rolling_ok=1
for n in "${NODES[@]}"; do
  ts=$SECONDS; t0=$(date +%s%3N)
  docker stop -t 15 "${CID[$n]}" >/dev/null || { fail "(d) docker stop node$n"; rolling_ok=0; }
  stop_ms=$(( $(date +%s%3N) - t0 ))
  code=$(docker inspect -f '{{.State.ExitCode}}' "${CID[$n]}")
  [ "$code" = 0 ] || { fail "(d) node$n exited $code on SIGTERM (want 0)"; rolling_ok=0; }
  # A write while node$n is down: it must catch up on it after its restart.
  up=(); for m in "${NODES[@]}"; do [ "$m" = "$n" ] || up+=("$m"); done
  api "${up[0]}" /api/v1/domains "{\"domain\":\"rolling-$n.test\",\"enabled_backends_tag\":\"a\"}" >/dev/null ||
    { fail "(d) write rolling-$n.test on node${up[0]} while node$n is down"; rolling_ok=0; }
  sleep 2   # let the client run against the remaining two nodes for a moment
  docker start "${CID[$n]}" >/dev/null || abort "(d) docker start node$n"
  if wait_until 60 cluster_ok 1 2 3 && wait_until 10 has_domain "$n" "rolling-$n.test"; then
    say "node$n: SIGTERM exit $code in ${stop_ms}ms, rejoined at last_applied=$APPLIED (leader node$LEADER) $((SECONDS - ts))s after stop; client: $(loop_stats /tmp/rolling)"
  else
    fail "(d) node$n did not rejoin within 60s (last_applied equal to the leader's)"; rolling_ok=0
  fi
done
sleep 2
docker exec "$CLIENT" touch /tmp/rolling/stop
wait_until 15 docker exec "$CLIENT" test -e /tmp/rolling/done || fail "(d) client loop did not stop"
read -r total okc retried failed <<<"$(loop_stats /tmp/rolling)"
say "client attempts that failed during the rolling restart (each retried on another address):"
docker exec "$CLIENT" sh -c 'head -20 /tmp/rolling/events; sort /tmp/rolling/hits | uniq -c | sed "s/^/  answered by /"' || true
[ "$rolling_ok" = 1 ] && pass "(d) rolling restart (docker stop = SIGTERM, docker start) of node1..node3, each rejoined before the next ($((SECONDS - t))s)"
if [ "$failed" = 0 ] && [ "$total" -gt 20 ]; then
  pass "(d) client loop during the rolling restart: $okc/$total ok, $retried recovered by retrying another address, 0 unrecovered"
else
  fail "(d) client loop during the rolling restart: $failed/$total requests failed on every address"
fi

# --- e. everything is still there -------------------------------------------------------
data_ok=1
for n in "${NODES[@]}"; do
  d=$(api "$n" /api/v1/domains 2>/dev/null || true); b=$(api "$n" /api/v1/backends 2>/dev/null || true)
  for dom in app.test after-kill.test rolling-1.test rolling-2.test rolling-3.test; do
    grep -q "\"domain\":\"$dom\"" <<<"$d" || { fail "(e) node$n lost domain $dom"; data_ok=0; }
  done
  for be in web web-b; do
    grep -q "\"id\":\"$be\"" <<<"$b" || { fail "(e) node$n lost backend $be"; data_ok=0; }
  done
  for dom in app.test rolling-3.test; do
    serves "$n" "$dom" || { fail "(e) node$n does not serve $dom"; data_ok=0; }
  done
done
cluster_ok 1 2 3 || { fail "(e) cluster status differs between nodes at the end"; data_ok=0; }
[ "$data_ok" = 1 ] && pass "(e) all 5 domains and 2 backends on every node, proxied by every node; 3 voters, leader node$LEADER, last_applied=$APPLIED everywhere"
exit 0

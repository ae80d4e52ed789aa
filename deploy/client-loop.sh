#!/bin/sh
# A client behind DNS round-robin, run by deploy/test.sh inside a busybox container on the
# cluster network. busybox wget does not fall back to the other A records of a name, so this
# does what a real client (or a load balancer) does: resolve the alias, try one address, and on
# failure try the next ones. A request counts as failed only when every address failed.
#
#   client-loop.sh ALIAS HOST_HEADER EXPECTED_BODY OUT_DIR COUNT
#
# COUNT > 0: make COUNT requests then exit. COUNT = 0: run until OUT_DIR/stop exists.
# OUT_DIR/stats (rewritten after every request): "total ok retried failed"
#   retried = succeeded, but not on the first address tried
# OUT_DIR/events: one line per failed attempt and per unrecovered request.
# OUT_DIR/hits: the address that answered, one line per successful request.
alias_name=$1 host=$2 want=$3 out=$4 count=$5
mkdir -p "$out"
: >"$out/events"
: >"$out/hits"
rm -f "$out/stop" "$out/done"
total=0 ok=0 retried=0 failed=0

while [ ! -e "$out/stop" ]; do
  if [ "$count" -gt 0 ] && [ "$total" -ge "$count" ]; then break; fi
  total=$((total + 1))
  # The A records, in the order the resolver returned them (Docker's DNS shuffles them).
  ips=$(nslookup "$alias_name" 2>/dev/null | awk '/^Name:/ {n = 1; next} n && /^Address/ {print $2}')
  set -- $ips
  n=$#
  if [ "$n" -eq 0 ]; then
    failed=$((failed + 1))
    echo "$(date +%T) request $total: $alias_name did not resolve" >>"$out/events"
  else
    # Start on a different address each time, like a client spreading its connections.
    start=$((total % n))
    j=0 done_ok=0 tried=""
    while [ "$j" -lt "$n" ]; do
      idx=$(( (start + j) % n + 1 ))
      eval "ip=\${$idx}"
      body=$(timeout 5 wget -q -O - --header "Host: $host" "http://$ip:8080/" 2>"$out/err")
      rc=$?
      if [ "$rc" -eq 0 ] && [ "$body" = "$want" ]; then
        done_ok=1
        echo "$ip" >>"$out/hits"
        break
      fi
      echo "$(date +%T) request $total: $ip failed (rc=$rc, body='$(echo "$body" | head -c 80)', $(tr '\n' ' ' <"$out/err" | head -c 160))" >>"$out/events"
      tried="$tried $ip"
      j=$((j + 1))
    done
    if [ "$done_ok" -eq 1 ]; then
      ok=$((ok + 1))
      [ "$j" -gt 0 ] && retried=$((retried + 1))
    else
      failed=$((failed + 1))
      echo "$(date +%T) request $total: FAILED on every address:$tried" >>"$out/events"
    fi
  fi
  echo "$total $ok $retried $failed" >"$out/stats.tmp" && mv "$out/stats.tmp" "$out/stats"
  [ "$count" -gt 0 ] || usleep 100000
done
touch "$out/done"

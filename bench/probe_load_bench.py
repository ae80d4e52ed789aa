#!/usr/bin/env python3
"""Active-probe load of a 3-node pingora-vhost cluster with many backends: probes per second
across the cluster, how bursty they are, and the CPU of the otherwise idle nodes.

    python3 bench/probe_load_bench.py [--backends 10000] [--k 2] [--bin PATH]
                                      [--warmup 25] [--seconds 30] [--ports 500]

Setup (loopback, temp dir, everything killed and removed on exit):
  * 3 nodes of the binary (default target/release/pingora-vhost), [health_check] defaults
    (interval 10 s, timeout 5 s) and `probers_per_backend = K` (left out with `--k 0`: for a
    binary from before the key existed, where every node probes every backend);
  * `--backends` backends seeded from node 1's config file (it starts alone; nodes 2 and 3
    join and get them with the snapshot), spread over `--ports` ports of one nginx that
    answers 200 to every GET and logs each request's time and User-Agent (which names the
    probing node; a binary from before that did not, so its probes only count in the total);
  * no client traffic: the nodes are idle but for gossip and probes.

After `--warmup` seconds (the start-up probe of every owned backend and the hand-over from a
node that saw the others late are over), for `--seconds`: probes/s in total and per node, the
busiest and quietest 100 ms of the window (a burst shows as a peak far above the mean), and
each node's CPU (utime + stime from /proc, % of one core).
"""

import argparse
import json
import os
import re
import subprocess
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import health_bench as hb  # noqa: E402  (process bookkeeping, ports, the node process)

UA_NODE = re.compile(rb"\(node (\d+)\)")


def start_origin(ports, d):
    """nginx on `ports`: 200 "ok" to every GET; each request logged as `<msec> <User-Agent>`."""
    conf = os.path.join(d, "nginx.conf")
    log = os.path.join(d, "probes.log")
    listens = "\n".join(f"    listen 127.0.0.1:{p};" for p in ports)
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
daemon off;
events {{ worker_connections 8192; }}
http {{
  log_format probe '$msec $http_user_agent';
  access_log {log} probe buffer=256k flush=1s;
  keepalive_requests 1000000;
  server {{
{listens}
    location / {{ return 200 "ok"; }}
  }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", conf, "-p", d], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hb.CHILDREN.append(p)
    hb.wait_until("nginx listening", 10, lambda: probe_port(ports[-1]), every=0.1)
    return log


def probe_port(port):
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def count_probes(log, t0, t1):
    """Probes logged in [t0, t1): per 100 ms bucket, and per node (0: no node in the UA)."""
    per_bucket, per_node = {}, {}
    with open(log, "rb") as f:
        for line in f:
            ts, _, ua = line.partition(b" ")
            t = float(ts)
            if not t0 <= t < t1:
                continue
            m = UA_NODE.search(ua)
            node = int(m.group(1)) if m else 0
            b = int(t * 10)
            per_bucket[b] = per_bucket.get(b, 0) + 1
            per_node[node] = per_node.get(node, 0) + 1
    return per_bucket, per_node


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=2, help="probers_per_backend; 0 = leave it out")
    ap.add_argument("--bin", default=os.path.join(hb.REPO, "target/release/pingora-vhost"))
    ap.add_argument("--warmup", type=float, default=25.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--ports", type=int, default=500,
                    help="origin ports: backends share a port (and the prober's idle "
                         "connection to it) 1 in backends/ports")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    import atexit


    atexit.register(hb.cleanup)
    signal.signal(signal.SIGTERM, hb.on_signal)
    signal.signal(signal.SIGINT, hb.on_signal)
    d = tempfile.mkdtemp(prefix="probe-bench-")
    hb.TMPDIRS.append(d)
    used = set()

    all_ports = [hb.free_port(used) for _ in range(args.ports)]
    log = start_origin(all_ports, d)

    # The last EXTRA backends are added through the API: enough writes after the seed for node
    # 1 to take a snapshot (snapshot_logs), which the joiners then install.
    extra = 12

    def address(i):
        return f"127.0.0.1:{all_ports[i % len(all_ports)]}"

    seed = "".join(
        f'[[backends]]\nid = "b-{i:06}"\naddress = "{address(i)}"\ntags = ["a"]\n'
        for i in range(args.backends - extra))
    health_lines = f"probers_per_backend = {args.k}\n" if args.k else ""
    ports = [[hb.free_port(used) for _ in range(5)] for _ in range(3)]
    gossip = [p[4] for p in ports]
    nodes = [hb.Node(i + 1, ports[i], gossip, health_lines, d, args.bin) for i in range(3)]
    # Node 1 starts alone with the seed (a one-node cluster commits it at once: a seed of
    # 10,000 backends in one Raft entry is slow to replicate in a debug build), then nodes 2
    # and 3 join and get it with the snapshot.
    with open(nodes[0].cfg) as f:
        text = f.read().replace("bootstrap_expect = 3", "bootstrap_expect = 1\nsnapshot_logs = 10")
    with open(nodes[0].cfg, "w") as f:
        f.write(text + "\n" + seed)
    t_start = time.time()
    last = f"b-{args.backends - 1:06}"
    for i, n in enumerate(nodes):
        n.start()
        hb.wait_until(f"node {n.id} API", 120,
                      lambda n=n: n.api_call("GET", "/api/v1/health")[0] == 200, every=0.2)
        if i == 0:
            first = f"b-{args.backends - extra - 1:06}"
            hb.wait_until("node 1 holds the seed", 300,
                          lambda: nodes[0].api_call("GET", f"/api/v1/backends/{first}")[0] == 200,
                          every=0.5)
            for j in range(args.backends - extra, args.backends):
                st, v = nodes[0].api_call("POST", "/api/v1/backends", {
                    "id": f"b-{j:06}", "address": address(j), "tags": ["a"]})
                if st != 201:
                    raise RuntimeError(f"adding b-{j:06}: {st} {v}")
    for n in nodes:
        hb.wait_until(f"node {n.id} holds the seed", int(os.environ.get("BENCH_SEED_WAIT", "300")),
                      lambda n=n: n.api_call("GET", f"/api/v1/backends/{last}")[0] == 200,
                      every=0.5)
    started = time.time()
    time.sleep(args.warmup)
    st, v = nodes[0].api_call("GET", "/api/v1/backends/b-000001")
    if os.environ.get("BENCH_DEBUG"):
        print(json.dumps(v, indent=1))
    def checks(n):
        # The node's own count of the probes it made (every backend's checks_total).
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", n.api, timeout=120)
        c.request("GET", "/api/v1/backends", headers={"authorization": f"Bearer {hb.TOKEN}"})
        v = json.loads(c.getresponse().read())
        c.close()
        items = v if isinstance(v, list) else (v or {}).get("items", [])
        return sum(b["health"]["checks_total"] for b in items), len(items)

    counted0 = [checks(n) for n in nodes]
    t0 = time.time()
    cpu0 = [cpu_seconds(n.proc.pid) for n in nodes]
    time.sleep(args.seconds)
    t1 = time.time()
    cpu1 = [cpu_seconds(n.proc.pid) for n in nodes]
    counted = [checks(n) for n in nodes]

    time.sleep(1.5)  # nginx flushes its log buffer every second
    lo, hi = int(t0 * 10), int(t1 * 10)
    per_bucket, per_node = count_probes(log, lo / 10, hi / 10)
    secs = (hi - lo) / 10
    total = sum(per_node.values())
    buckets = [per_bucket.get(b, 0) for b in range(lo, hi)]
    print(f"binary: {args.bin}")
    print(f"seeded on every node {started - t_start:.0f} s after start")
    print(f"{args.backends} backends, 3 nodes, interval 10 s, "
          f"probers_per_backend = {args.k or 'absent (every node probes every backend)'}; "
          f"measured {secs:.0f} s after a {t0 - started:.0f} s warm-up")
    print(f"probes/s across the cluster: {total / secs:.0f} "
          f"(every node probing every backend would be {3 * args.backends / 10:.0f})")
    for node in sorted(per_node):
        label = f"node {node}" if node else "no node in User-Agent"
        print(f"  {label}: {per_node[node] / secs:.0f}/s")
    print(f"per 100 ms across the cluster: mean {total / len(buckets):.1f}, "
          f"min {min(buckets)}, max {max(buckets)}")
    for n, (c0, _), (c1, listed) in zip(nodes, counted0, counted):
        print(f"node {n.id}: {(c1 - c0) / (t1 - t0):.0f} probes/s by its own count "
              f"(checks_total over {listed} backends)")
    for n, a, b in zip(nodes, cpu0, cpu1):
        print(f"node {n.id} CPU: {100 * (b - a) / (t1 - t0):.1f} % of a core")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Active-probe load of a 3-node pingora-vhost cluster with many backends: probes per second
across the cluster, how bursty they are, and the CPU of the otherwise idle nodes.

    python3 bench/probe_load_bench.py [--backends 10000] [--k 2] [--bin PATH]
                                      [--warmup 25] [--seconds 30] [--origins 4]

Setup (loopback, temp dir, everything killed and removed on exit):
  * 3 nodes of the binary (default target/release/pingora-vhost), [health_check] defaults
    (interval 10 s, timeout 5 s) and `probers_per_backend = K` (left out with `--k 0`: for a
    binary from before the key existed, where every node probes every backend);
  * `--backends` backends seeded from node 1's config file (it starts alone; nodes 2 and 3
    join and get them with the snapshot), spread over `--ports` ports of `--origins` origin
    processes (asyncio, HTTP/1.1 keep-alive) that answer 200 to every GET and count the
    health probes per node (the probe's User-Agent names the node; a binary from before that
    did not say, so its probes count per source connection only in the total);
  * no client traffic: the nodes are idle but for gossip and probes.

After `--warmup` seconds (the start-up probe of every owned backend and the hand-over from a
node that saw the others late are over), for `--seconds`: probes/s in total and per node, the
busiest and quietest 100 ms of the window (a burst shows as a peak far above the mean), and
each node's CPU (utime + stime from /proc, % of one core).
"""

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import health_bench as hb  # noqa: E402  (process bookkeeping, ports, the node process)

UA_NODE = re.compile(rb"\(node (\d+)\)")


def run_origin(ports):
    """One origin process listening on `ports`: counts GETs per (node, 100 ms bucket); prints
    them as JSON on SIGTERM."""
    counts = {}

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = UA_NODE.search(head)
                node = int(m.group(1)) if m else 0
                key = (node, int(time.time() * 10))
                counts[key] = counts.get(key, 0) + 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main():
        servers = [await asyncio.start_server(handle, "127.0.0.1", p, backlog=1024)
                   for p in ports]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        for srv in servers:
            srv.close()
        print(json.dumps([[n, b, c] for (n, b), c in counts.items()]), flush=True)

    asyncio.run(main())


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
    ap.add_argument("--origins", type=int, default=2, help="origin processes")
    ap.add_argument("--ports", type=int, default=500,
                    help="ports in all: backends share a port (and the prober's idle "
                         "connection to it) only 1 in backends/ports")
    ap.add_argument("--origin", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.origin:
        run_origin([int(p) for p in args.origin.split(",")])
        return

    args.bin = os.path.abspath(args.bin)
    import atexit
    import subprocess

    atexit.register(hb.cleanup)
    signal.signal(signal.SIGTERM, hb.on_signal)
    signal.signal(signal.SIGINT, hb.on_signal)
    d = tempfile.mkdtemp(prefix="probe-bench-")
    hb.TMPDIRS.append(d)
    used = set()

    origins = []
    all_ports = []
    for _ in range(args.origins):
        ports = [hb.free_port(used) for _ in range(max(1, args.ports // args.origins))]
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--origin",
                              ",".join(map(str, ports))],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        hb.CHILDREN.append(p)
        if b"ready" not in p.stdout.readline():
            raise RuntimeError("origin did not start")
        origins.append((ports, p))
        all_ports.extend(ports)

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

    per_bucket = {}
    per_node = {}
    lo, hi = int(t0 * 10), int(t1 * 10)
    for _, p in origins:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
        hb.CHILDREN.remove(p)
        for node, bucket, count in json.loads(out.decode().strip().splitlines()[-1]):
            if lo <= bucket < hi:
                per_bucket[bucket] = per_bucket.get(bucket, 0) + count
                per_node[node] = per_node.get(node, 0) + count
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

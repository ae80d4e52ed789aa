#!/usr/bin/env python3
"""Cluster benchmark for pingora-vhost (Python 3 standard library only).

Starts real nodes of target/release/pingora-vhost on loopback in a temp dir, with its own
origin HTTP server, measures, prints a table, writes bench/results/cluster.md, and removes
everything it started on exit (also on Ctrl-C, on errors and when --max-seconds is reached).

Phases:
  A. 3-node cluster, 10 domains:
     - resident memory (VmRSS) and idle CPU per node;
     - proxy requests/s on one node, Host header rotating over the 10 domains;
     - convergence: time from the start of a write call on a follower (POST a new domain) until
       the new route answers 200 on all 3 nodes' proxies, over --writes writes (p50/p99);
     - writes/s through a follower: sequential, and with --concurrency concurrent clients.
  B. 3-node cluster seeded (through the config file) with --domains domains and as many
     backends (one backend per domain, its own tag):
     - `--check` time of that config file;
     - time from spawn until every node serves the last seeded domain;
     - VmRSS and idle CPU per node;
     - proxy requests/s on one node, Host rotating over all domains (and over 10 of them);
     - memory per domain, API list pages (p99 < 100 ms), write convergence with the large
       table in the state (p99 < 50 ms);
     - a follower is stopped, --down-writes changes are made through the leader, and it is
       restarted: time until it has them all and serves the last one (< 5 s);
     - a 4th node joins (same config file as the others), then a 5th (config file without
       the seed): time from spawn until its status last_applied equals the leader's and
       sampled routes answer 200 through its proxy, and until it is a voter; its VmRSS. Each
       is removed again (DELETE /api/v1/cluster/members/{id}) before the next.

Load generator: wrk (1 thread, --connections connections, a Lua script rotating the Host header)
when installed, else a Python keep-alive load loop (much slower; the output says which).

Usage:
  bench/cluster_bench.py [--bin PATH] [--writes 200] [--domains 10000] [--duration 10]
                         [--connections 32] [--concurrency 8] [--hc-interval 3600]
                         [--results bench/results/cluster.md] [--max-seconds 1200] [--keep-tmp]
"""

import argparse
import asyncio
import datetime
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "bench-token"
SECRET = "bench-cluster-secret"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything started by this script, killed by cleanup().
PROCS = []
TMP = None
KEEP_TMP = False


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Origin server (runs in its own process: `cluster_bench.py --origin-serve PORT`)
# ------------------------------------------------------------------------------------------

def serve_origin(port):
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n")

    class Origin(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            n = self.buf.count(b"\r\n\r\n")
            if n:
                self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
                self.t.write(resp * n)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Origin, "127.0.0.1", port, backlog=1024,
                                          reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------
# Ports, processes, cleanup
# ------------------------------------------------------------------------------------------

_used_ports = set()


def free_port():
    """A loopback port free for TCP and UDP (gossip), never handed out before."""
    for _ in range(500):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        try:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", port))
            u.close()
        except OSError:
            s.close()
            continue
        s.close()
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def kill_proc(p, grace=10.0):
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGCONT)
        p.terminate()
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)
    except ProcessLookupError:
        pass


def cleanup():
    for p in list(PROCS):
        try:
            kill_proc(p, grace=5.0)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    PROCS.clear()
    if TMP and os.path.isdir(TMP):
        if KEEP_TMP:
            log(f"kept temp dir {TMP}")
        else:
            shutil.rmtree(TMP, ignore_errors=True)


class Deadline(Exception):
    pass


def _on_signal(signum, _frame):
    if signum == signal.SIGALRM:
        raise Deadline("--max-seconds reached")
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------------------
# HTTP helpers
# ------------------------------------------------------------------------------------------

class Http:
    """A keep-alive HTTP/1.1 connection to one address that reconnects when needed."""

    def __init__(self, port, timeout=10.0):
        self.port = port
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, raw
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Api(Http):
    def call(self, method, path, body=None):
        status, raw = self.request(method, path, body,
                                   {"Authorization": f"Bearer {TOKEN}"})
        try:
            value = json.loads(raw) if raw.strip() else None
        except ValueError:
            value = raw.decode(errors="replace")
        return status, value


def wait_until(what, timeout, fn, interval=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = fn()
        except Exception as e:  # noqa: BLE001 - node still starting
            v, last = None, e
        if v:
            return v
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last error: {last})")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------
# Nodes
# ------------------------------------------------------------------------------------------

class Node:
    def __init__(self, tmp, node_id, expect, hc_interval, extra_path=None):
        self.id = node_id
        self.expect = expect
        self.dir = os.path.join(tmp, f"node-{node_id}")
        os.makedirs(self.dir, exist_ok=True)
        self.http = free_port()
        self.https = free_port()
        self.api_port = free_port()
        self.rpc = free_port()
        self.gossip = free_port()
        self.hc_interval = hc_interval
        self.extra_path = extra_path
        self.config = os.path.join(self.dir, "node.toml")
        self.proc = None
        self.api = Api(self.api_port)
        self.spawned_at = None

    def write_config(self, seeds):
        text = f"""[proxy]
listen_addr = "127.0.0.1:{self.https}"
listen_addr_http = "127.0.0.1:{self.http}"
management_api_addr = "127.0.0.1:{self.api_port}"
threads = 1

[api]
token = "{TOKEN}"

[logging]
level = "warn"

[cluster]
node_id = {self.id}
data_dir = '{os.path.join(self.dir, "data")}'
rpc_addr = "127.0.0.1:{self.rpc}"
gossip_addr = "127.0.0.1:{self.gossip}"
seeds = [{", ".join(f'"127.0.0.1:{s}"' for s in seeds)}]
bootstrap_expect = {self.expect}
secret = "{SECRET}"

[health_check]
interval_secs = {self.hc_interval}
timeout_secs = 2
path = "/health"
"""
        if self.extra_path:
            with open(self.extra_path) as f:
                text += "\n" + f.read()
        with open(self.config, "w") as f:
            f.write(text)

    def spawn(self, binary):
        out = open(os.path.join(self.dir, "stdout.log"), "ab")
        err = open(os.path.join(self.dir, "stderr.log"), "ab")
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen([binary, "--config", self.config], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     start_new_session=True)
        out.close()
        err.close()
        PROCS.append(self.proc)

    def check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"node {self.id} exited with {self.proc.returncode}:\n"
                               + self.stderr_tail())

    def stderr_tail(self, n=40):
        try:
            with open(os.path.join(self.dir, "stderr.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout=60):
        def ready():
            self.check_alive()
            s, _ = self.api.call("GET", "/api/v1/health")
            return s == 200
        wait_until(f"node {self.id} API", timeout, ready)

    def status(self):
        s, v = self.api.call("GET", "/api/v1/cluster/status")
        return v if s == 200 else None

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        if self.proc is not None:
            kill_proc(self.proc)
            if self.proc in PROCS:
                PROCS.remove(self.proc)
            self.proc = None
        self.api.close()


def machine_busy(seconds=1.0):
    """Share of all CPUs busy (user+nice+system+irq+softirq+steal) over `seconds`, in %."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
        return busy, sum(v[:8])
    b0, t0 = snap()
    time.sleep(seconds)
    b1, t1 = snap()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def cpu_seconds(pid):
    """user + system CPU time of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(nodes, seconds=5.0):
    """CPU % of one core used by each node while no request is sent."""
    before = {x.id: x.cpu_seconds() for x in nodes}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {x.id: (x.cpu_seconds() - before[x.id]) / dt * 100 for x in nodes}


def start_cluster(tmp, binary, n, hc_interval, extra_path=None):
    nodes = [Node(tmp, i, n, hc_interval, extra_path) for i in range(1, n + 1)]
    seeds = [x.gossip for x in nodes]
    for x in nodes:
        x.write_config(seeds)
        x.spawn(binary)
    for x in nodes:
        x.wait_ready()
    wait_converged(nodes, 60)
    return nodes


def wait_converged(nodes, timeout):
    def ok():
        sts = []
        for x in nodes:
            x.check_alive()
            sts.append(x.status())
        if any(s is None for s in sts):
            return None
        ids = sorted(m["node_id"] for m in sts[0]["members"])
        same = all(s["leader_id"] == sts[0]["leader_id"]
                   and s["last_applied"] == sts[0]["last_applied"]
                   and sorted((m["node_id"], m["voter"]) for m in s["members"])
                   == [(i, True) for i in ids] for s in sts)
        return sts if (same and sts[0]["leader_id"] is not None
                       and len(ids) == len(nodes)) else None
    return wait_until("cluster convergence", timeout, ok, interval=0.1)


def leader_and_follower(nodes):
    st = wait_converged(nodes, 30)
    leader = st[0]["leader_id"]
    follower = next(x for x in nodes if x.id != leader)
    return next(x for x in nodes if x.id == leader), follower


def route_ok(port, host, conn_cache):
    c = conn_cache.get(port)
    if c is None:
        c = conn_cache[port] = Http(port, timeout=5)
    status, _ = c.request("GET", "/", headers={"Host": host})
    return status == 200


# ------------------------------------------------------------------------------------------
# Load generation
# ------------------------------------------------------------------------------------------

def run_load(tmp, port, hosts, duration, connections):
    """Returns (req/s, tool description, non-2xx count)."""
    wrk = shutil.which("wrk")
    if wrk:
        script = os.path.join(tmp, f"rotate-{len(hosts)}.lua")
        with open(script, "w") as f:
            f.write("local hosts = {\n")
            for h in hosts:
                f.write(f'  "{h}",\n')
            f.write("}\nlocal n = #hosts\nlocal i = 0\n")
            f.write("math.randomseed(42)\n")
            f.write("request = function()\n  i = math.random(n)\n"
                    "  return wrk.format(\"GET\", \"/\", {[\"Host\"] = hosts[i]})\nend\n")
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "-s", script,
               f"http://127.0.0.1:{port}/"]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=duration + 60).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors = re.search(r"Socket errors:.*", out)
        if not m:
            raise RuntimeError(f"cannot parse wrk output:\n{out}")
        desc = f"wrk -t1 -c{connections} -d{duration}s, Host random over {len(hosts)} domains"
        if errors:
            desc += f" ({errors.group(0)})"
        return float(m.group(1)), desc, int(non2xx.group(1)) if non2xx else 0
    # Python fallback: threads with keep-alive connections.
    stop = time.monotonic() + duration
    counts = []
    bad = []
    lock = threading.Lock()

    def worker(seed):
        rnd = random.Random(seed)
        c = Http(port, timeout=5)
        n = b = 0
        while time.monotonic() < stop:
            s, _ = c.request("GET", "/", headers={"Host": rnd.choice(hosts)})
            n += 1
            b += s != 200
        with lock:
            counts.append(n)
            bad.append(b)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(min(connections, 8))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    elapsed = time.monotonic() - t0
    return (sum(counts) / elapsed,
            f"Python keep-alive loop, {len(threads)} threads, {duration}s (wrk not installed)",
            sum(bad))


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------

def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def settle_after_load(nodes, hosts):
    """After a wrk run, wait until every node serves `hosts` with 200 again.

    wrk drops its in-flight requests when it stops; pingora-vhost counts those client aborts
    as backend failures and may open the backend's circuit breaker for ~1 s (503). Waiting here
    keeps that out of the next measurement (it is reported separately).
    Returns how long the wait took, in seconds.
    """
    t0 = time.monotonic()
    conns = {}
    for x in nodes:
        for h in hosts:
            wait_until(f"{h} 200 on node {x.id} after load", 30,
                       lambda: route_ok(x.http, h, conns), interval=0.05)
    for c in conns.values():
        c.close()
    return time.monotonic() - t0


def measure_convergence(nodes, follower, count):
    conns = {}
    total, acks, timeouts, slow = [], [], 0, []
    # Open the keep-alive polling connections before timing anything: the measurement is about
    # replication, not about TCP connects.
    for x in nodes:
        route_ok(x.http, "warm-up.invalid", conns)
    for i in range(count):
        host = f"conv-{i}.bench"
        t0 = time.perf_counter()
        s, body = follower.api.call("POST", "/api/v1/domains",
                                    {"domain": host, "enabled_backends_tag": "a"})
        ack = time.perf_counter() - t0
        if s != 201:
            raise RuntimeError(f"POST domain {host}: {s} {body}")
        pending = {x.http: x.id for x in nodes}
        seen = {}
        deadline = t0 + 5.0
        while pending and time.perf_counter() < deadline:
            for port in list(pending):
                if route_ok(port, host, conns):
                    seen[pending.pop(port)] = time.perf_counter() - t0
        if pending:
            timeouts += 1
            slow.append((i, ack, seen, sorted(pending.values())))
            continue
        t = time.perf_counter() - t0
        total.append(t)
        acks.append(ack)
        if t > 0.05:
            slow.append((i, ack, seen, []))
    for c in conns.values():
        c.close()
    return total, acks, timeouts, slow


def measure_writes(follower, prefix, count, concurrency):
    lat = []
    lock = threading.Lock()
    errors = []

    def worker(k, items):
        api = Api(follower.api_port)
        mine = []
        for i in items:
            t = time.perf_counter()
            s, body = api.call("POST", "/api/v1/domains",
                               {"domain": f"{prefix}-{i}.bench", "enabled_backends_tag": "a"})
            mine.append(time.perf_counter() - t)
            if s != 201:
                errors.append(f"{s} {body}")
        api.close()
        with lock:
            lat.extend(mine)

    chunks = [list(range(k, count, concurrency)) for k in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(k, c)) for k, c in enumerate(chunks)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} writes failed, first: {errors[0]}")
    return count / elapsed, lat


def target(value, limit, label):
    """`label: met` when value < limit (or <=), else `label: NOT met`."""
    return f"{label}: {'met' if value <= limit else 'NOT met'}"


def api_rows(rows, node, n, samples=20):
    """Times list pages of the API at n domains (each page: p50/p99 over `samples` calls)."""
    def timed(path):
        lat, value = [], None
        for _ in range(samples):
            t = time.perf_counter()
            s, value = node.api.call("GET", path)
            lat.append(time.perf_counter() - t)
            if s != 200:
                raise RuntimeError(f"GET {path}: {s} {str(value)[:200]}")
        return lat, value

    _, first = timed("/api/v1/domains?limit=100")
    cursor = first.get("next_cursor") if isinstance(first, dict) else None
    pages = [("domains, first page of 100", "/api/v1/domains?limit=100"),
             ("domains, prefix filter", f"/api/v1/domains?q=h{n // 2}&limit=100"),
             ("backends, first page of 100", "/api/v1/backends?limit=100"),
             ("backends, tag filter", f"/api/v1/backends?tag=t{n // 2}&limit=100"),
             ("backends seen down", "/api/v1/backends?healthy=false&limit=100")]
    if cursor:
        pages.insert(1, ("domains, next page (cursor)",
                         f"/api/v1/domains?limit=100&cursor={cursor}"))
    for label, path in pages:
        lat, value = timed(path)
        total = value.get("total") if isinstance(value, dict) else len(value or [])
        p99 = pct(lat, 99) * 1000
        rows.append(("B", f"API {label} (`{path.split('?')[0]}`, total {total}), n={samples}",
                     f"p50 {pct(lat, 50) * 1000:.1f} ms / p99 {p99:.1f} ms",
                     target(p99, 100, "< 100 ms")))


def write_seed_file(path, origin_port, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'[[virtual_hosts]]\ndomain = "h{i}.bench"\nenabled_backends_tag = "t{i}"\n\n')
        for i in range(n):
            f.write(f'[[backends]]\nid = "b{i}"\naddress = "127.0.0.1:{origin_port}"\n'
                    f'tags = ["t{i}"]\n\n')


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

def main():
    global TMP, KEEP_TMP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "pingora-vhost"))
    ap.add_argument("--writes", type=int, default=200, help="convergence samples (>= 200)")
    ap.add_argument("--seq-writes", type=int, default=300)
    ap.add_argument("--conc-writes", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--writes-big", type=int, default=200,
                    help="convergence samples with the large table")
    ap.add_argument("--down-writes", type=int, default=10000,
                    help="changes made while a follower is down")
    ap.add_argument("--domains", type=int, default=10000)
    ap.add_argument("--duration", type=int, default=10, help="seconds per load run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--hc-interval", type=int, default=3600,
                    help="[health_check] interval_secs of every node (default 3600: one probe "
                         "round at start, so probes do not disturb the measurements)")
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "results", "cluster.md"))
    ap.add_argument("--max-seconds", type=int, default=1200, help="hard bound for the whole run")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--origin-serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.origin_serve:
        serve_origin(args.origin_serve)
        return 0

    KEEP_TMP = args.keep_tmp
    if not os.access(args.bin, os.X_OK):
        log(f"binary not found: {args.bin} (build it with `cargo build --release`)")
        return 2
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, _on_signal)
    signal.alarm(args.max_seconds)
    TMP = tempfile.mkdtemp(prefix="pvh-cluster-bench-")
    try:
        return run(args)
    finally:
        signal.alarm(0)
        cleanup()


def run(args):
    results = {"busy_start": machine_busy()}
    rows = []
    binary = args.bin
    origin_port = free_port()
    origin = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--origin-serve",
                               str(origin_port)], stdin=subprocess.DEVNULL,
                              start_new_session=True)
    PROCS.append(origin)
    wait_until("origin", 10, lambda: Http(origin_port).request("GET", "/")[0] == 200)
    log(f"origin on 127.0.0.1:{origin_port}; binary {binary}")

    # ---------------- Phase A: 3 nodes, small table ----------------
    log("phase A: starting a 3-node cluster")
    a_dir = os.path.join(TMP, "a")
    t0 = time.monotonic()
    nodes = start_cluster(a_dir, binary, 3, args.hc_interval)
    rows.append(("A", "3-node cluster formed (spawn -> converged)",
                 f"{time.monotonic() - t0:.2f} s"))
    leader, follower = leader_and_follower(nodes)
    log(f"leader {leader.id}, writing through follower {follower.id}")
    s, b = follower.api.call("POST", "/api/v1/backends",
                             {"id": "origin", "address": f"127.0.0.1:{origin_port}",
                              "tags": ["a"]})
    assert s == 201, (s, b)
    small_hosts = [f"d{i}.bench" for i in range(10)]
    for h in small_hosts:
        s, b = follower.api.call("POST", "/api/v1/domains",
                                 {"domain": h, "enabled_backends_tag": "a"})
        assert s == 201, (s, b)
    conns = {}
    for x in nodes:
        for h in small_hosts:
            wait_until(f"{h} on node {x.id}", 10, lambda: route_ok(x.http, h, conns))
    wait_converged(nodes, 10)
    results["rss_a"] = [x.rss_mib() for x in nodes]
    for x, rss in zip(nodes, results["rss_a"]):
        rows.append(("A", f"VmRSS node {x.id} (10 domains, 1 backend)", f"{rss:.1f} MiB"))
    idle = idle_cpu(nodes)
    rows.append(("A", "idle CPU per node (5 s, no requests), % of one core",
                 ", ".join(f"node {k}: {v:.0f} %" for k, v in sorted(idle.items()))))

    log("phase A: proxy load, 10 domains")
    rps_small, tool_small, bad = run_load(TMP, follower.http, small_hosts, args.duration,
                                          args.connections)
    results["rps_small"] = rps_small
    rows.append(("A", f"proxy req/s on node {follower.id}, 10 domains",
                 f"{rps_small:,.0f} ({bad} non-2xx)"))
    settle = settle_after_load(nodes, small_hosts)
    rows.append(("A", "after the load run: time until every node serves the 10 domains "
                 "with 200 again", f"{settle:.2f} s"))

    log(f"phase A: convergence over {args.writes} writes")
    total, acks, timeouts, slow = measure_convergence(nodes, follower, args.writes)
    slow_lines = []
    for i, ack, seen, missing in slow:
        per_node = ", ".join(f"node {k}: {v * 1000:.1f} ms" for k, v in sorted(seen.items()))
        slow_lines.append(f"write #{i}: ack {ack * 1000:.1f} ms; route 200 at {per_node}"
                          + (f"; never on {missing}" if missing else ""))
    for line in slow_lines:
        log("slow convergence sample: " + line)
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    rows.append(("A", f"write ack on follower (POST -> 201), n={len(acks)}",
                 f"p50 {ms(pct(acks, 50))} / p99 {ms(pct(acks, 99))}"))
    rows.append(("A", f"convergence: POST on follower -> 200 on all 3 proxies, n={len(total)}",
                 f"p50 {ms(pct(total, 50))} / p99 {ms(pct(total, 99))} / max "
                 f"{ms(max(total) if total else float('nan'))}"
                 + (f" ({timeouts} over 5 s)" if timeouts else "")))
    results["conv_p99_ms"] = pct(total, 99) * 1000

    log(f"phase A: {args.seq_writes} sequential writes")
    wps_seq, lat_seq = measure_writes(follower, "seq", args.seq_writes, 1)
    rows.append(("A", f"writes/s through follower, sequential (n={args.seq_writes})",
                 f"{wps_seq:,.0f}/s (latency p50 {ms(pct(lat_seq, 50))}, "
                 f"p99 {ms(pct(lat_seq, 99))})"))
    log(f"phase A: {args.conc_writes} writes, {args.concurrency} concurrent clients")
    wps_conc, lat_conc = measure_writes(follower, "conc", args.conc_writes, args.concurrency)
    rows.append(("A", f"writes/s through follower, {args.concurrency} concurrent clients "
                 f"(n={args.conc_writes})",
                 f"{wps_conc:,.0f}/s (latency p50 {ms(pct(lat_conc, 50))}, "
                 f"p99 {ms(pct(lat_conc, 99))})"))
    results["wps_seq"], results["wps_conc"] = wps_seq, wps_conc
    for x in nodes:
        x.stop()

    # ---------------- Phase B: 3 nodes, large table ----------------
    n = args.domains
    log(f"phase B: 3-node cluster seeded with {n} domains and {n} backends")
    b_dir = os.path.join(TMP, "b")
    os.makedirs(b_dir)
    seed_path = os.path.join(b_dir, "seed.toml")
    write_seed_file(seed_path, origin_port, n)
    check_cfg = Node(b_dir, 99, 1, args.hc_interval, seed_path)
    check_cfg.write_config([])
    t0 = time.monotonic()
    chk = subprocess.run([binary, "--config", check_cfg.config, "--check"], capture_output=True,
                         text=True, timeout=300)
    rows.append(("B", f"`--check` of a config file with {n} vhosts + {n} backends",
                 f"{time.monotonic() - t0:.2f} s (exit {chk.returncode})"))
    t0 = time.monotonic()
    nodes = start_cluster(b_dir, binary, 3, args.hc_interval, seed_path)
    last_host = f"h{n - 1}.bench"
    conns = {}
    for x in nodes:
        wait_until(f"{last_host} on node {x.id}", 120, lambda: route_ok(x.http, last_host, conns),
                   interval=0.1)
    serve_all = time.monotonic() - t0
    rows.append(("B", f"3 nodes from spawn to serving all {n} seeded domains",
                 f"{serve_all:.2f} s", target(serve_all, 30, "< 30 s")))
    sts = wait_converged(nodes, 30)
    # Let the first health-probe round (every backend once, at start) finish.
    time.sleep(3)
    for x in nodes:
        rss = x.rss_mib()
        rows.append(("B", f"VmRSS node {x.id} ({n} domains, {n} backends)",
                     f"{rss:.1f} MiB", target(rss, 1024, "< 1 GiB")))
    idle = idle_cpu(nodes)
    rows.append(("B", "idle CPU per node (5 s, no requests), % of one core",
                 ", ".join(f"node {k}: {v:.1f} %" for k, v in sorted(idle.items())),
                 target(max(idle.values()), 2, "< 2 %")))
    leader, follower = leader_and_follower(nodes)
    log(f"phase B: proxy load, {n} domains")
    big_hosts = [f"h{i}.bench" for i in range(n)]
    rps_big, tool_big, bad = run_load(TMP, follower.http, big_hosts, args.duration,
                                      args.connections)
    results["rps_big"] = rps_big
    # The figure: the routing lookup's cost with n domains in the table, under the
    # same traffic as the 10-domain case. Host over all n domains (each on its own backend)
    # measures the memory a request touches as well (a different domain and backend each
    # time): printed beside it; bench/hot_domains/run.sh puts nginx's figure for that beside
    # ours.
    rps_big10, _, bad10 = run_load(TMP, follower.http, big_hosts[:10], args.duration,
                                   args.connections)
    rows.append(("B", f"proxy req/s on node {follower.id}, {n}-domain table, Host over 10 "
                 f"of them", f"{rps_big10:,.0f} ({bad10} non-2xx; {rps_big10 / rps_small:.2f}x "
                 "the 10-domain case)",
                 target(-rps_big10 / rps_small, -0.9,
                        "routing lookup cost independent of the number of domains: "
                        "within noise of 10 domains (>= 0.90x)")))
    rows.append(("B", f"proxy req/s on node {follower.id}, Host over all {n} domains "
                 "(a different domain and backend each request)",
                 f"{rps_big:,.0f} ({bad} non-2xx; {rps_big / rps_small:.2f}x the 10-domain case)"))
    samples = [f"h{i}.bench" for i in (0, n // 2, n - 1)]
    settle = settle_after_load([follower], samples + big_hosts[:10])
    rows.append(("B", "after the load runs: time until the loaded node serves sampled domains "
                 "with 200 again", f"{settle:.2f} s"))


    def join(node_id, extra, label):
        """Spawns node `node_id`, times its catch-up, then removes it from the cluster."""
        log(f"phase B: node {node_id} joins ({label})")
        node = Node(b_dir, node_id, 3, args.hc_interval, extra)
        node.write_config([x.gossip for x in nodes])
        node.spawn(binary)
        spawned = node.spawned_at
        conns_j = {}
        applied = {}

        def caught_up():
            node.check_alive()
            s = node.status()
            lead = leader.status()
            if not s or not lead or s["last_applied"] < lead["last_applied"]:
                return None
            applied["v"] = s["last_applied"]
            return all(route_ok(node.http, h, conns_j) for h in samples)
        wait_until(f"node {node_id} caught up", 240, caught_up, interval=0.05)
        caught = time.monotonic() - spawned

        def is_voter():
            s = leader.status()
            return s and any(m["node_id"] == node_id and m["voter"] for m in s["members"])
        wait_until(f"node {node_id} voter", 60, is_voter, interval=0.05)
        voter = time.monotonic() - spawned
        rows.append(("B", f"node {node_id} joins, {label}: spawn -> last_applied = leader's "
                     f"and sampled routes 200", f"{caught:.2f} s (last_applied {applied['v']})",
                     target(caught, 5, "< 5 s")))
        rows.append(("B", f"node {node_id} joins, {label}: spawn -> voter in the leader's status",
                     f"{voter:.2f} s"))
        time.sleep(1)
        rows.append(("B", f"VmRSS node {node_id} after catching up", f"{node.rss_mib():.1f} MiB"))
        s, body = leader.api.call("DELETE", f"/api/v1/cluster/members/{node_id}")
        if s != 204:
            raise RuntimeError(f"DELETE member {node_id}: {s} {body}")
        node.stop()

    # Memory per domain: what the large table adds to a node, over the small cluster's RSS.
    rss_a = statistics.mean(results["rss_a"])
    per_domain = [(x.rss_mib() - rss_a) * 1024 * 1024 / n for x in nodes]
    rows.append(("B", f"memory per domain + backend pair ((VmRSS - phase A VmRSS) / {n})",
                 ", ".join(f"node {x.id}: {v:,.0f} B" for x, v in zip(nodes, per_domain))))

    log("phase B: API pages")
    api_rows(rows, follower, n)

    log(f"phase B: convergence over {args.writes_big} writes with {n} domains in the state")
    s, b = follower.api.call("POST", "/api/v1/backends",
                             {"id": "origin", "address": f"127.0.0.1:{origin_port}",
                              "tags": ["a"]})
    assert s == 201, (s, b)
    total_b, acks_b, timeouts_b, _ = measure_convergence(nodes, follower, args.writes_big)
    conv_b = pct(total_b, 99) * 1000
    rows.append(("B", f"convergence with {n} domains: POST on follower -> 200 on all 3 "
                 f"proxies, n={len(total_b)}",
                 f"p50 {pct(total_b, 50) * 1000:.1f} ms / p99 {conv_b:.1f} ms"
                 + (f" ({timeouts_b} over 5 s)" if timeouts_b else ""),
                 target(conv_b, 50, "p99 < 50 ms")))

    k = args.down_writes
    down = follower
    log(f"phase B: node {down.id} down through {k} changes")
    down.stop()
    wps_down, _ = measure_writes(leader, "down", k, args.concurrency)
    last_down = f"down-{k - 1}.bench"
    down.spawn(binary)
    spawned = down.spawned_at
    conns_d = {}

    def down_caught_up():
        down.check_alive()
        st, lead = down.status(), leader.status()
        if not st or not lead or st["last_applied"] < lead["last_applied"]:
            return None
        return route_ok(down.http, last_down, conns_d)
    wait_until(f"node {down.id} caught up", 240, down_caught_up, interval=0.05)
    caught = time.monotonic() - spawned
    rows.append(("B", f"node {down.id} down through {k} changes ({wps_down:,.0f} writes/s "
                 f"through the leader meanwhile): restart -> last_applied = leader's and the "
                 f"last change serves", f"{caught:.2f} s", target(caught, 5, "< 5 s")))

    join(4, seed_path, f"same config file as the others (with the {n}-entry seed)")
    join(5, None, "config file without [[virtual_hosts]]/[[backends]]")
    for x in nodes:
        x.stop()

    # ---------------- Report ----------------
    rows = [r if len(r) == 4 else (*r, "") for r in rows]
    width = max(len(r[1]) for r in rows)
    print()
    print(f"{'ph':<3} {'measurement':<{width}}  {'value':<40}  target")
    print(f"{'-' * 3} {'-' * width}  {'-' * 40}  {'-' * 20}")
    for ph, what, val, tgt in rows:
        print(f"{ph:<3} {what:<{width}}  {val:<40}  {tgt}")
    print()
    print(f"load generator: {tool_small} / {tool_big}")
    verdict = "met" if results["conv_p99_ms"] < 50 else "NOT met"
    print(f"convergence target p99 < 50 ms: {verdict} ({results['conv_p99_ms']:.1f} ms)")

    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(binary)).isoformat(timespec="seconds")
    load1 = os.getloadavg()[0]
    cmd = " ".join(["bench/cluster_bench.py"] + sys.argv[1:])
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("# Cluster benchmark\n\n")
        f.write(f"Command: `{cmd}`  \n")
        f.write(f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; commit {rev}"
                f"{' (working tree modified)' if dirty else ''}; binary {binary} built {mtime}  \n")
        f.write(f"Machine: {os.cpu_count()} CPUs, {results['busy_start']:.0f} % busy in the second "
                f"before the run (other work), 1-min load average {load1:.2f} at the end; "
                f"everything (3-5 nodes, origin, load generator) on the same machine, "
                f"loopback.  \n")
        if results["busy_start"] > 10.0:
            f.write("**Noisy run**: other work was running when the benchmark started; "
                    "throughput numbers are pessimistic.  \n")
        f.write(f"Nodes: `[proxy] threads = 1`, `[logging] level = \"warn\"`, "
                f"`[health_check] interval_secs = {args.hc_interval}`. "
                f"Origin: Python asyncio server in its own process (answers `200 ok`).  \n")
        f.write(f"Load generator: {tool_small}; {tool_big}.\n\n")
        f.write("| phase | measurement | value | target |\n|---|---|---|---|\n")
        for ph, what, val, tgt in rows:
            f.write(f"| {ph} | {what} | {val} | {tgt} |\n")
        f.write(f"\nConvergence target p99 < 50 ms: **{verdict}** "
                f"({results['conv_p99_ms']:.1f} ms).\n")
        if slow_lines:
            f.write("\nConvergence samples over 50 ms (time from the start of the POST):\n\n")
            for line in slow_lines:
                f.write(f"- {line}\n")
    log(f"results written to {args.results}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, Deadline) as e:
        log(f"interrupted: {e}")
        sys.exit(130)

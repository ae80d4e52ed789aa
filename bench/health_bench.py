#!/usr/bin/env python3
"""Health-plane benchmark: how fast does a 3-node pingora-vhost cluster route around a backend
that dies under traffic, and how many client requests fail meanwhile?

    python3 bench/health_bench.py [--kills 20] [--configs default,interval1] [--bin PATH]
                                  [--out bench/results/health.md] [--max-seconds 1800]

Setup (all on loopback, everything in a temp dir, killed and removed on exit):
  * 3 nodes of target/release/pingora-vhost (one Raft cluster, gossip between them);
  * 2 origin backends, each its own Python process (threaded http.server, HTTP/1.1 keep-alive)
    answering its name on `/` and 200 on `/health`; pool "a" of domain bench.health = both;
  * continuous GET load through every node's HTTP listener (2 client threads per node,
    ~100 req/s per node, keep-alive).

Each kill: SIGKILL one origin (alternating), then poll every node's
`GET /api/v1/backends/<victim>` every ~20 ms. Its `requests` counter counts the node's picks of
that backend, i.e. its connection attempts (every one fails once the process is dead). For each
node, "routed around" = the poll at which that counter was seen to increase for the last time
(0 when it never increased after the kill): the first moment after which no request through that
node reaches the dead backend. The observation ends once no node can pick the victim any more
(every node has it probed down or a live peer reporting it down -- a fixed point until the
backend comes back) plus a 1 s tail, or at a bound (censored, reported). Failed requests = client
GETs that started in [kill, end of observation] and did not answer 200. Then the origin is
restarted on the same port and the next kill waits until every node routes to it again.

Two configurations: `default` ([health_check] defaults: interval 10 s, timeout 5 s, 3 failures
down, 2 successes up) and `interval1` (interval_secs = 1, timeout_secs = 1).
"""

import argparse
import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "bench-token"
HOST = "bench.health"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_S = 0.005
TAIL_S = 1.0

# ---------------------------------------------------------------------------------------------
# Origin process mode
# ---------------------------------------------------------------------------------------------


def run_origin(name, port):
    body = name.encode()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path.startswith("/health"):
                data = b"ok"
                self.send_response(200)
            else:
                data = body
                self.send_response(200)
                self.send_header("x-backend", name)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    class S(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

    srv = S(("127.0.0.1", port), H)
    print("ready", flush=True)
    srv.serve_forever()


# ---------------------------------------------------------------------------------------------
# Process bookkeeping: everything we start is killed at exit
# ---------------------------------------------------------------------------------------------

CHILDREN = []
TMPDIRS = []


def cleanup():
    for p in CHILDREN:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in CHILDREN:
        try:
            p.wait(timeout=5)
        except Exception:
            pass
    CHILDREN.clear()
    if not os.environ.get("BENCH_KEEP_TMP"):
        for d in TMPDIRS:
            shutil.rmtree(d, ignore_errors=True)


def on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def free_port(used):
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            u.close()
        if port not in used:
            used.add(port)
            return port


def wait_until(what, timeout, f, every=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = f()
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            v, last = None, e
        if v:
            return v
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last error: {last})")
        time.sleep(every)


class Origin:
    def __init__(self, name, port, logdir):
        self.name, self.port, self.logdir = name, port, logdir
        self.proc = None

    def start(self):
        log = open(os.path.join(self.logdir, f"origin-{self.name}.log"), "a")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--origin", self.name, str(self.port)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        CHILDREN.append(self.proc)
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"origin {self.name} did not start on port {self.port}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)
        CHILDREN.remove(self.proc)
        self.proc = None


class Node:
    def __init__(self, nid, ports, seeds, health_lines, d, binary):
        self.id = nid
        self.http, self.https, self.api, self.rpc, self.gossip = ports
        self.dir = os.path.join(d, f"node{nid}")
        os.makedirs(self.dir)
        self.binary = binary
        self.cfg = os.path.join(self.dir, "node.toml")
        seeds_s = ", ".join(f'"127.0.0.1:{p}"' for p in seeds)
        with open(self.cfg, "w") as f:
            f.write(f"""[proxy]
listen_addr = "127.0.0.1:{self.https}"
listen_addr_http = "127.0.0.1:{self.http}"
management_api_addr = "127.0.0.1:{self.api}"
threads = 1

[api]
token = "{TOKEN}"

[cluster]
node_id = {nid}
data_dir = '{os.path.join(self.dir, "data")}'
rpc_addr = "127.0.0.1:{self.rpc}"
gossip_addr = "127.0.0.1:{self.gossip}"
seeds = [{seeds_s}]
bootstrap_expect = 3
secret = "bench-secret"

[logging]
level = "warn"

[health_check]
{health_lines}
""")
        self.proc = None
        self.local = threading.local()

    def start(self):
        out = open(os.path.join(self.dir, "stdout.log"), "a")
        err = open(os.path.join(self.dir, "stderr.log"), "a")
        self.proc = subprocess.Popen([self.binary, "--config", self.cfg], cwd=self.dir,
                                     stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        CHILDREN.append(self.proc)

    def conn(self):
        c = getattr(self.local, "c", None)
        if c is None:
            c = http.client.HTTPConnection("127.0.0.1", self.api, timeout=5)
            self.local.c = c
        return c

    def api_call(self, method, path, body=None):
        for attempt in range(2):
            c = self.conn()
            try:
                headers = {"authorization": f"Bearer {TOKEN}"}
                data = None
                if body is not None:
                    data = json.dumps(body).encode()
                    headers["content-type"] = "application/json"
                c.request(method, path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                try:
                    return r.status, json.loads(raw) if raw else None
                except ValueError:
                    return r.status, raw.decode(errors="replace")
            except (OSError, http.client.HTTPException):
                c.close()
                self.local.c = None
                if attempt == 1:
                    raise

    def logs(self):
        out = []
        for n in ("stdout.log", "stderr.log"):
            try:
                with open(os.path.join(self.dir, n)) as f:
                    out.append(f.read()[-4000:])
            except OSError:
                pass
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


class Load:
    """Client threads; every GET recorded as (node, t_start, ok, detail)."""

    def __init__(self, nodes, per_node=2, pause=0.01):
        self.stop = threading.Event()
        self.samples = []
        self.lock = threading.Lock()
        self.threads = []
        for n in nodes:
            for _ in range(per_node):
                t = threading.Thread(target=self.run, args=(n, pause), daemon=True)
                t.start()
                self.threads.append(t)

    def run(self, node, pause):
        c = None
        while not self.stop.is_set():
            t0 = time.monotonic()
            ok, detail = False, ""
            try:
                if c is None:
                    c = http.client.HTTPConnection("127.0.0.1", node.http, timeout=10)
                c.request("GET", "/", headers={"host": HOST})
                r = c.getresponse()
                body = r.read()
                ok = r.status == 200
                detail = f"{r.status} {body[:80]!r}"
                if r.getheader("connection", "").lower() == "close":
                    c.close()
                    c = None
            except (OSError, http.client.HTTPException) as e:
                detail = f"transport error: {e!r}"
                if c is not None:
                    c.close()
                c = None
            with self.lock:
                self.samples.append((node.id, t0, ok, detail))
            time.sleep(pause)

    def snapshot(self):
        with self.lock:
            return list(self.samples)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
        return self.snapshot()


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def backend_view(node, bid):
    st, v = node.api_call("GET", f"/api/v1/backends/{bid}")
    if st != 200:
        raise RuntimeError(f"node {node.id}: GET backend {bid}: {st} {v}")
    return v


def cannot_pick(v):
    """This node will not pick the backend again until something changes: probed down, or a
    live peer reports it down (its own open breaker then never half-opens)."""
    h = v["health"]
    return (not v["healthy"]) and (h["active"] == "down" or len(h["peers_reporting_down"]) > 0)


def run_config(name, health_lines, kills, binary, deadline, settle_max, revive_max):
    d = tempfile.mkdtemp(prefix=f"pvh-health-bench-{name}-")
    TMPDIRS.append(d)
    used = set()
    ports = [[free_port(used) for _ in range(5)] for _ in range(3)]
    seeds = [p[4] for p in ports]
    nodes = [Node(i + 1, ports[i], seeds, health_lines, d, binary) for i in range(3)]
    origins = [Origin("o1", free_port(used), d), Origin("o2", free_port(used), d)]
    for o in origins:
        o.start()
    for n in nodes:
        n.start()

    def converged():
        views = [n.api_call("GET", "/api/v1/cluster/status")[1] for n in nodes]
        leaders = {v.get("leader_id") for v in views}
        return (len(leaders) == 1 and None not in leaders
                and all(len(v.get("members", [])) == 3 for v in views))

    try:
        wait_until("cluster of 3 with a leader", 60, converged, every=0.2)
    except RuntimeError:
        for n in nodes:
            print(f"--- node {n.id} logs ---\n{n.logs()}", file=sys.stderr)
        raise

    def write(path, body):
        st, v = nodes[0].api_call("POST", path, body)
        if st in (200, 201):
            return True
        if st == 409:  # created by an earlier attempt that timed out client-side
            return True
        raise RuntimeError(f"POST {path}: {st} {v}")

    for o in origins:
        wait_until(f"create backend {o.name}", 30,
                   lambda o=o: write("/api/v1/backends",
                                     {"id": o.name, "address": f"127.0.0.1:{o.port}",
                                      "tags": ["a"]}), every=0.3)
    wait_until("create domain", 30,
               lambda: write("/api/v1/domains", {"domain": HOST, "enabled_backends_tag": "a"}),
               every=0.3)

    def all_use(bid):
        """Every node reports `bid` healthy and picks it."""
        before = [backend_view(n, bid)["requests"] for n in nodes]

        def check():
            vs = [backend_view(n, bid) for n in nodes]
            return all(v["healthy"] for v in vs) and all(
                v["requests"] > b for v, b in zip(vs, before))
        return check

    load = Load(nodes)
    for o in origins:
        wait_until(f"every node routes to {o.name}", revive_max, all_use(o.name), every=0.1)

    results = []
    print(f"[{name}] {kills} kills; [health_check]: "
          f"{'; '.join(health_lines.strip().splitlines()) if health_lines else '(defaults)'}", flush=True)
    t_load = time.monotonic()
    for k in range(kills):
        if time.monotonic() > deadline:
            print(f"[{name}] global time bound reached after {k} kills", flush=True)
            break
        victim = origins[k % 2]
        base = [backend_view(n, victim.name)["requests"] for n in nodes]
        t_kill = time.monotonic()
        victim.kill()
        last_inc = [None] * 3          # time of the poll that saw the counter's last increase
        count = list(base)
        settled_at = None
        censored = False
        stop_at = None
        polls = 0
        while True:
            now = time.monotonic()
            views = []
            for i, n in enumerate(nodes):
                v = backend_view(n, victim.name)
                t = time.monotonic()
                views.append(v)
                if v["requests"] > count[i]:
                    count[i] = v["requests"]
                    last_inc[i] = t
            polls += 1
            if settled_at is None and all(cannot_pick(v) for v in views):
                settled_at = time.monotonic()
                stop_at = settled_at + TAIL_S
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            if settled_at is None and now - t_kill > settle_max:
                censored = True
                break
            time.sleep(POLL_S)
        t_end = time.monotonic()
        per_node = [0.0 if last_inc[i] is None else last_inc[i] - t_kill for i in range(3)]
        attempts = [count[i] - base[i] for i in range(3)]
        late = [settled_at is not None and last_inc[i] is not None and last_inc[i] > settled_at
                for i in range(3)]
        window = [s for s in load.snapshot() if t_kill <= s[1] <= t_end]
        failed = [s for s in window if not s[2]]
        res = {
            "kill": k + 1, "victim": victim.name, "per_node": per_node,
            "all": max(per_node), "attempts": attempts, "requests": len(window),
            "failed": len(failed), "failed_detail": [s[3] for s in failed[:5]],
            "censored": censored, "late": any(late),
            "settle": None if settled_at is None else settled_at - t_kill,
            "poll_period": (t_end - t_kill) / max(1, polls),
        }
        results.append(res)
        print(f"[{name}] kill {k + 1:2d} {victim.name}: every node routed around after "
              f"{res['all'] * 1000:7.1f} ms (per node "
              f"{', '.join(f'{x * 1000:.0f}' for x in per_node)} ms; attempts {attempts}); "
              f"GETs {len(window)}, failed {len(failed)}"
              f"{' CENSORED' if censored else ''}{' LATE-ATTEMPT' if res['late'] else ''}",
              flush=True)
        # Bring it back on the same port; wait until every node uses it again.
        victim.start()
        wait_until(f"every node routes to revived {victim.name}", revive_max,
                   all_use(victim.name), every=0.1)

    samples = load.finish()
    rate = len(samples) / max(1e-9, time.monotonic() - t_load)
    total_failed = sum(1 for s in samples if not s[2])
    for o in origins:
        if o.proc is not None:
            o.kill()
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.kill()
        n.proc.wait(timeout=10)
        CHILDREN.remove(n.proc)
    return {"name": name,
            "health": "; ".join(health_lines.split("\n")).strip("; ") or "(defaults)",
            "results": results, "total_requests": len(samples), "total_failed": total_failed,
            "rate": rate}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def ms(x):
    return "n/a" if x != x else f"{x * 1000:.0f}"


def summarize(run):
    res = run["results"]
    alls = [r["all"] for r in res]
    per_node = [[r["per_node"][i] for r in res] for i in range(3)]
    return {
        "kills": len(res),
        "p50": pct(alls, 50), "p99": pct(alls, 99), "max": max(alls) if alls else float("nan"),
        "node_p50": [pct(x, 50) for x in per_node], "node_p99": [pct(x, 99) for x in per_node],
        "failed": sum(r["failed"] for r in res), "requests": sum(r["requests"] for r in res),
        "censored": sum(1 for r in res if r["censored"]),
        "late": sum(1 for r in res if r["late"]),
        "attempts": sum(sum(r["attempts"]) for r in res),
        "settle_p50": pct([r["settle"] for r in res if r["settle"] is not None], 50),
        "poll_period": statistics.mean(r["poll_period"] for r in res) if res else float("nan"),
    }


def render(runs, args, binary):
    lines = []
    lines.append("# Health plane: time to route around a dead backend")
    lines.append("")
    lines.append(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    lines.append(f"- machine: {os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}")
    lines.append(f"- binary: `{os.path.relpath(binary, REPO)}`")
    lines.append(f"- command: `python3 bench/health_bench.py --kills {args.kills} "
                 f"--configs {args.configs}`")
    lines.append("- cluster: 3 nodes on loopback (1 data-plane thread each), 2 origins "
                 "(Python threaded http.server, separate processes), pool of 2")
    lines.append("- load: 2 keep-alive GET clients per node (10 ms pause between GETs), through "
                 "every node for the whole run")
    lines.append("- kill: SIGKILL of one origin (alternating), restarted on the same port after "
                 "each measurement; the next kill waits until every node routes to it again")
    lines.append("- routed around (per node): the poll (3 nodes polled in turn, "
                 f"{POLL_S * 1000:.0f} ms pause between rounds) at which the node's `requests` counter for the dead backend (its "
                 "connection attempts) increased, measured from the kill; 0 = never tried it "
                 "after the kill. Every node: the max over the 3 nodes")
    lines.append("- failed: client GETs started between the kill and the end of the observation "
                 "(every node unable to pick the backend + 1 s) that did not answer 200")
    lines.append("")
    lines.append("| config | kills | every node p50 (ms) | p99 (ms) | max (ms) | node1 p50/p99 | "
                 "node2 p50/p99 | node3 p50/p99 | attempts on dead | GETs in windows | failed |"
                 " censored |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        s = summarize(run)
        lines.append(
            f"| {run['name']} (`{run['health']}`) | {s['kills']} | {ms(s['p50'])} | "
            f"{ms(s['p99'])} | {ms(s['max'])} | "
            + " | ".join(f"{ms(a)}/{ms(b)}" for a, b in zip(s["node_p50"], s["node_p99"]))
            + f" | {s['attempts']} | {s['requests']} | {s['failed']} | {s['censored']} |")
    lines.append("")
    for run in runs:
        s = summarize(run)
        lines.append(f"- {run['name']}: {run['total_requests']} GETs over the whole run "
                     f"(~{run['rate']:.0f} req/s across the 3 nodes), "
                     f"{run['total_failed']} failed; fixed point (no node can pick the dead "
                     f"backend) reached after p50 {ms(s['settle_p50'])} ms; kills with an attempt "
                     f"after that point: {s['late']}; one poll round of the 3 nodes took "
                     f"{s['poll_period'] * 1000:.1f} ms on average (the time resolution)")
    lines.append("")
    lines.append("<details><summary>per kill</summary>")
    lines.append("")
    lines.append("| config | kill | victim | every node (ms) | per node (ms) | attempts per node | "
                 "fixed point (ms) | GETs | failed |")
    lines.append("|---|---:|---|---:|---|---|---:|---:|---:|")
    for run in runs:
        for r in run["results"]:
            lines.append(
                f"| {run['name']} | {r['kill']} | {r['victim']} | {ms(r['all'])} | "
                f"{' / '.join(ms(x) for x in r['per_node'])} | {r['attempts']} | "
                f"{'censored' if r['censored'] else ms(r['settle'])} | {r['requests']} | "
                f"{r['failed']} {'; '.join(r['failed_detail'])} |")
    lines.append("")
    lines.append("</details>")
    return "\n".join(lines) + "\n"


CONFIGS = {
    "default": "",
    "interval1": "interval_secs = 1\ntimeout_secs = 1\n",
}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--origin":
        run_origin(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--configs", default="default,interval1")
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "pingora-vhost"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "health.md"))
    ap.add_argument("--max-seconds", type=float, default=1800,
                    help="global bound; stops kill rounds after it")
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        sys.exit(f"{binary} not found: build it with `cargo build --release`")
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + args.max_seconds
    runs = []
    for name in args.configs.split(","):
        health = CONFIGS[name]
        # Bounds: settle within 3 probe intervals + slack; revival within 2 intervals + slack.
        interval = 1 if "interval_secs = 1" in health else 10
        runs.append(run_config(name, health, args.kills, binary, deadline,
                               settle_max=3 * interval + 10, revive_max=3 * interval + 15))
    report = render(runs, args, binary)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print()
    print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

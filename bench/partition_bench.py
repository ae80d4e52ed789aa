#!/usr/bin/env python3
"""Partition benchmark for pingora-vhost (Python 3 standard library; needs root, iproute2, iptables).

Runs a nemesis schedule against a real 3-node cluster whose nodes each live in their own
network namespace (veth pairs into a bridge in another namespace; this script's own leg on the
bridge is 10.77.S.254, where the origin server listens too). Faults are real: kill -9, SIGSTOP,
and iptables DROP rules inside a node's namespace that cut it off from the two other nodes
(clients and the origin still reach it).

For each fault kind (kill, stop, isolate-leader, isolate-follower), --runs times (on a fresh
cluster every --runs-per-cluster runs, default 1): waits for a settled cluster, applies the fault to the leader (or to a
follower), keeps it --fault-secs, heals it (restart after kill -9, SIGCONT, flush the rules),
and watches --after-secs more. Meanwhile:

- writers POST a new domain every 50 ms through every node (open loop: a slow answer does not
  delay the next write), each answer recorded; the writer of the node under fault pauses from
  the fault until --after-secs after the heal, unless --write-via all;
- readers GET a proxied host through every node, one request at a time, new connection each;
- a poller reads the faulty leader's `GET /api/v1/cluster/status` every 50 ms.

Printed per fault kind:
- recovery p50 / p99 (max with few runs): time from the completed fault until the first write
  sent after it is acknowledged (201) through a majority-side node;
- quorum-false: for an isolated leader, time until its status says `"quorum": false`;
- longest write gap through a majority-side node after the heal (and, for an isolated
  follower, during the whole fault too);
- term changes caused by the heal;
- proxy errors per node (majority side; the isolated/frozen node listed apart);
- write latency with nothing wrong (acknowledged writes sent 2 to 0.5 s before each fault),
  p50 / p99: the noise floor of the gaps above;
- consistency: acknowledged writes missing on some node, and writes answered with a "not
  applied" error (not 504 / "outcome": "unknown", not an answer-less timeout) present on some
  node.

Usage (as root):
  bench/partition_bench.py [--bin target/debug/pingora-vhost] [--runs 5] [--runs-per-cluster 1]
                           [--faults kill,stop,isolate-leader,isolate-follower]
                           [--fault-secs 6] [--follower-fault-secs 10] [--after-secs 5]
                           [--write-via majority|all] [--max-seconds 1500] [--keep-tmp]
Everything it creates (namespaces, processes, temp dir) is removed on exit.
"""

import argparse
import concurrent.futures
import http.client
import http.server
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "bench-token"
SECRET = "bench-cluster-secret"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "app.test"
N = 3


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args, check=True, stdin=None):
    r = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {r.stderr.strip()}")
    return r.stdout


# ------------------------------------------------------------------------------------------
# Network namespaces (same layout as tests/it/common/netns.rs)
# ------------------------------------------------------------------------------------------

class Net:
    def __init__(self, tag):
        self.prefix = f"pvh{os.getpid()}-{tag}"
        self.host_if = f"pvh{os.getpid()}h{tag}"[:15]
        self.made = []
        self.remove_stale()
        used = sh("ip", "-4", "-o", "addr", "show")
        self.subnet = next(s for s in range(1, 251) if f" 10.77.{s}." not in used)
        br = self.ns("br")
        self.add_ns(br)
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for i in range(1, N + 1):
            ns = self.ns(f"n{i}")
            self.add_ns(ns)
            sh("ip", "-n", br, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "-n", br, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", br, "link", "add", "host", "type", "veth", "peer", "name", self.host_if,
           "netns", "1")
        sh("ip", "-n", br, "link", "set", "host", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")

    @staticmethod
    def remove_stale():
        def owner(name):
            digits = ""
            for ch in name[3:]:
                if not ch.isdigit():
                    break
                digits += ch
            return int(digits) if name.startswith("pvh") and digits else None
        for line in sh("ip", "netns", "list").splitlines():
            name = line.split()[0] if line.split() else ""
            pid = owner(name)
            if pid and not os.path.exists(f"/proc/{pid}"):
                sh("ip", "netns", "del", name, check=False)

    def ns(self, suffix):
        return f"{self.prefix}-{suffix}"

    def add_ns(self, name):
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def ip(self, i):
        return f"10.77.{self.subnet}.{i}"

    @property
    def host_ip(self):
        return f"10.77.{self.subnet}.254"

    def isolate(self, i):
        rules = "*filter\n"
        for p in range(1, N + 1):
            if p != i:
                rules += f"-A INPUT -s {self.ip(p)} -j DROP\n-A OUTPUT -d {self.ip(p)} -j DROP\n"
        rules += "COMMIT\n"
        sh("ip", "netns", "exec", self.ns(f"n{i}"), "iptables-restore", "--noflush", stdin=rules)

    def heal(self, i):
        ns = self.ns(f"n{i}")
        sh("ip", "netns", "exec", ns, "iptables", "-F", "INPUT")
        sh("ip", "netns", "exec", ns, "iptables", "-F", "OUTPUT")

    def destroy(self):
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made = []
        sh("ip", "link", "del", self.host_if, check=False)


# ------------------------------------------------------------------------------------------
# Origin, nodes, HTTP
# ------------------------------------------------------------------------------------------

class Origin(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"origin"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


def request(ip, port, method, path, body=None, timeout=20.0, host=None):
    """One request on a new connection: (status, text), or (None, error text)."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if host:
        headers["Host"] = host
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


class Node:
    API, HTTP, HTTPS, RPC, GOSSIP = 9090, 8080, 8443, 7101, 7946

    def __init__(self, net, tmp, i, binary, origin):
        self.net, self.i, self.binary = net, i, binary
        self.ip = net.ip(i)
        self.dir = os.path.join(tmp, f"node-{i}")
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "node.toml")
        seeds = ", ".join(f'"{net.ip(p)}:{self.GOSSIP}"' for p in range(1, N + 1))
        with open(self.config, "w") as f:
            f.write(f"""[proxy]
listen_addr = "{self.ip}:{self.HTTPS}"
listen_addr_http = "{self.ip}:{self.HTTP}"
management_api_addr = "{self.ip}:{self.API}"
threads = 1

[api]
token = "{TOKEN}"
allow_plaintext = true  # the API listens on the namespace's private address

[cluster]
node_id = {i}
data_dir = '{os.path.join(self.dir, "data")}'
rpc_addr = "{self.ip}:{self.RPC}"
gossip_addr = "{self.ip}:{self.GOSSIP}"
seeds = [{seeds}]
bootstrap_expect = {N}
secret = "{SECRET}"
snapshot_logs = 100000

[health_check]
interval_secs = 1
timeout_secs = 1

[[virtual_hosts]]
domain = "{HOST}"
enabled_backends_tag = "a"

[[backends]]
id = "origin"
address = "{origin}"
tags = ["a"]
""")
        self.proc = None

    def spawn(self):
        out = open(os.path.join(self.dir, "stdout.log"), "ab")
        err = open(os.path.join(self.dir, "stderr.log"), "ab")
        # `ip netns exec` execs the binary: the child's pid is the node's.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.net.ns(f"n{self.i}"), self.binary, "--config",
             self.config], cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True)
        out.close()
        err.close()

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def api(self, method, path, body=None, timeout=2.0):
        return request(self.ip, self.API, method, path, body, timeout)

    def status(self):
        s, text = self.api("GET", "/api/v1/cluster/status")
        try:
            return json.loads(text) if s == 200 else None
        except ValueError:
            return None

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.i} exited: {self.proc.returncode}")
            if self.api("GET", "/api/v1/health")[0] == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"node {self.i} not ready within {timeout}s")


def wait_converged(nodes, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = [n.status() for n in nodes]
        if all(st) and len({(s["leader_id"], s["term"], s["last_applied"]) for s in st}) == 1 \
                and st[0]["leader_id"] is not None and all(s["quorum"] for s in st):
            return st[0]
        time.sleep(0.1)
    raise RuntimeError(f"cluster did not converge within {timeout}s: {[n.status() for n in nodes]}")


# ------------------------------------------------------------------------------------------
# Load: writers, readers, status poller
# ------------------------------------------------------------------------------------------

class Load:
    def __init__(self, nodes, tag, write_via_faulty):
        self.nodes = nodes
        self.write_via_faulty = write_via_faulty
        # The node under fault: no writes through it unless --write-via all.
        self.faulty = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.writes = []   # (via, domain, sent, done, status, body)
        self.reads = []    # (via, at, ok, detail)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=400)
        self.threads = [threading.Thread(target=self.writer, args=(n, tag), daemon=True)
                        for n in nodes]
        self.threads += [threading.Thread(target=self.reader, args=(n,), daemon=True)
                         for n in nodes]
        for t in self.threads:
            t.start()

    def writer(self, node, tag):
        seq = 0
        nxt = time.monotonic()
        while not self.stop.is_set():
            if self.write_via_faulty or self.faulty != node.i:
                seq += 1
                domain = f"{tag}-{node.i}-{seq}.test"
                self.pool.submit(self.write_one, node, domain)
            nxt += 0.05
            time.sleep(max(0.0, nxt - time.monotonic()))

    def write_one(self, node, domain):
        sent = time.monotonic()
        status, body = request(node.ip, Node.API, "POST", "/api/v1/domains",
                               {"domain": domain, "enabled_backends_tag": "a"}, timeout=20.0)
        with self.lock:
            self.writes.append((node.i, domain, sent, time.monotonic(), status, body))

    def reader(self, node):
        while not self.stop.is_set():
            at = time.monotonic()
            status, body = request(node.ip, Node.HTTP, "GET", "/", timeout=10.0, host=HOST)
            ok = status == 200 and body == "origin"
            with self.lock:
                self.reads.append((node.i, at, ok, f"{status} {body[:80]}"))
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        self.pool.shutdown(wait=True)


def acked(w):
    return w[4] == 201


def refused(w):
    status, body = w[4], w[5]
    if status is None or status == 201 or status == 504:
        return False
    try:
        return json.loads(body).get("outcome") != "unknown"
    except (ValueError, AttributeError):
        return True


def longest_gap(writes, vias, start, end):
    out = 0.0
    for via in vias:
        acks = sorted(w[3] for w in writes if w[0] == via and acked(w) and start <= w[3] <= end)
        acks = [start] + acks + [end]
        out = max(out, max(b - a for a, b in zip(acks, acks[1:])))
    return out


def gap_detail(writes, vias, start, end):
    """Where the longest gap is, and what the writes answered right after it (for the log)."""
    best = (0.0, None, None)
    for via in vias:
        acks = sorted(w[3] for w in writes if w[0] == via and acked(w) and start <= w[3] <= end)
        acks = [start] + acks + [end]
        for a, b in zip(acks, acks[1:]):
            if b - a > best[0]:
                best = (b - a, via, a)
    gap, via, at = best
    if via is None:
        return ""
    after = sorted((w for w in writes if w[0] == via and at <= w[3] <= at + gap + 0.01),
                   key=lambda w: w[3])[:4]
    return (f"via {via} from +{at - start:.2f} s: "
            + "; ".join(f"{w[4]} after {w[3] - w[2]:.2f} s {w[5][:90]}" for w in after))


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


# ------------------------------------------------------------------------------------------
# One fault kind
# ------------------------------------------------------------------------------------------

def run_kind(kind, args, tmp_root, binary):
    """All runs of one fault kind, on fresh clusters of --runs-per-cluster runs each (the
    domain count grows with every run, and with it the cost of a write)."""
    result = {"kind": kind, "recovery": [], "quorum_false": [], "gap_heal": [],
              "gap_fault": [], "baseline": [], "term_changes": 0, "proxy_errors": {},
              "faulty_proxy_errors": {}, "runs": 0, "writes": 0, "acked": 0, "refused": 0,
              "missing": 0, "applied_refused": 0}
    done, c = 0, 0
    while done < args.runs:
        runs = min(args.runs_per_cluster, args.runs - done)
        run_cluster(kind, args, os.path.join(tmp_root, f"{kind}-{c}"), binary, runs, result, c)
        done += runs
        c += 1
    return result


def run_cluster(kind, args, tmp, binary, runs, result, index):
    tag = {"kill": "k", "stop": "s", "isolate-leader": "l", "isolate-follower": "f"}[kind]
    net = Net(f"{tag}{index}")
    origin = http.server.ThreadingHTTPServer((net.host_ip, 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    nodes = [Node(net, tmp, i, binary, f"{net.host_ip}:{origin.server_address[1]}")
             for i in range(1, N + 1)]
    load = None
    try:
        for n in nodes:
            n.spawn()
        for n in nodes:
            n.wait_ready()
        wait_converged(nodes)
        load = Load(nodes, tag, args.write_via == "all")
        for _ in range(runs):
            run = result["runs"]
            st = wait_converged(nodes)
            time.sleep(2)
            st = wait_converged(nodes)
            leader = st["leader_id"]
            target = leader if kind != "isolate-follower" else \
                next(i for i in range(1, N + 1) if i != leader)
            majority = [i for i in range(1, N + 1) if i != target]
            tnode = nodes[target - 1]
            load.faulty = target
            fault_secs = args.follower_fault_secs if kind == "isolate-follower" else args.fault_secs
            if kind == "kill":
                tnode.kill9()
            elif kind == "stop":
                tnode.signal(signal.SIGSTOP)
            else:
                net.isolate(target)
            t_fault = time.monotonic()
            qf = None
            while time.monotonic() - t_fault < fault_secs:
                if kind == "isolate-leader" and qf is None:
                    s = tnode.status()
                    if s and s.get("quorum") is False:
                        qf = time.monotonic() - t_fault
                time.sleep(0.05)
            if kind == "kill":
                tnode.spawn()
            elif kind == "stop":
                tnode.signal(signal.SIGCONT)
            else:
                net.heal(target)
            t_heal = time.monotonic()
            time.sleep(args.after_secs)
            t_end = time.monotonic()
            load.faulty = None
            st2 = wait_converged(nodes)
            with load.lock:
                writes = list(load.writes)
                reads = list(load.reads)
            # Write latency with nothing wrong: writes sent in the settle before the fault (not
            # in its last 0.5 s: those may meet the fault).
            result["baseline"] += [w[3] - w[2] for w in writes
                                   if acked(w) and t_fault - 2.0 <= w[2] < t_fault - 0.5]
            after = [w for w in writes if w[0] in majority and acked(w) and w[2] >= t_fault]
            rec = min((w[3] - t_fault for w in after), default=None)
            if kind != "isolate-follower":
                result["recovery"].append(rec if rec is not None else float("inf"))
            if kind == "isolate-leader":
                result["quorum_false"].append(qf if qf is not None else float("inf"))
            result["gap_heal"].append(longest_gap(writes, majority, t_heal, t_end))
            if kind == "isolate-follower":
                result["gap_fault"].append(longest_gap(writes, majority, t_fault, t_end))
            # The heal must not move the term (a new term only for a lost leader).
            term_at_heal = st["term"] if kind == "isolate-follower" else None
            if term_at_heal is not None and st2["term"] != term_at_heal:
                result["term_changes"] += 1
            if kind != "isolate-follower" and st2["term"] != st["term"] + 1:
                # A failover should cost exactly one term.
                result["term_changes"] += 1
            for via, at, ok, detail in reads:
                if t_fault - 2 <= at <= t_end and not ok:
                    bucket = "faulty_proxy_errors" if via == target else "proxy_errors"
                    result[bucket][via] = result[bucket].get(via, 0) + 1
                    if via != target:
                        log(f"  proxy error via majority node {via} at "
                            f"{at - t_fault:+.2f} s from the fault: {detail}")
            result["runs"] += 1
            log(f"{kind} run {run + 1}: target {target} (leader {leader}) "
                f"recovery {rec if rec is None else round(rec, 3)} s, quorum-false {qf}, "
                f"gap after heal {result['gap_heal'][-1]:.3f} s "
                f"({gap_detail(writes, majority, t_heal, t_end)}), term {st['term']} -> {st2['term']}")
        load.finish()
        writes = load.writes
        wait_converged(nodes)
        time.sleep(3)
        wait_converged(nodes)
        # Distinct writes: an acknowledged one missing on some node, a refused one on some node.
        missing, applied_refused = set(), set()
        for n in nodes:
            names, path = set(), "/api/v1/domains?limit=1000"
            while path:
                s, text = n.api("GET", path, timeout=10.0)
                if s != 200:
                    raise RuntimeError(f"GET {path} on node {n.i}: {s} {text[:200]}")
                page = json.loads(text)
                names |= {d["domain"] for d in page["items"]}
                cursor = page["next_cursor"]
                path = cursor and f"/api/v1/domains?limit=1000&cursor={cursor}"
            missing |= {w[1] for w in writes if acked(w) and w[1] not in names}
            applied_refused |= {w[1] for w in writes if refused(w) and w[1] in names}
        missing, applied_refused = len(missing), len(applied_refused)
        result["writes"] += len(writes)
        result["acked"] += sum(1 for w in writes if acked(w))
        result["refused"] += sum(1 for w in writes if refused(w))
        result["missing"] += missing
        result["applied_refused"] += applied_refused
    finally:
        if load and not load.stop.is_set():
            load.finish()
        for n in nodes:
            n.kill9()
        origin.shutdown()
        net.destroy()


def fmt(v):
    return "-" if v != v else ("inf" if v == float("inf") else f"{v:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "debug", "pingora-vhost"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--faults", default="kill,stop,isolate-leader,isolate-follower")
    ap.add_argument("--runs-per-cluster", type=int, default=1,
                    help="runs on one cluster before a fresh one is started")
    ap.add_argument("--fault-secs", type=float, default=6.0)
    ap.add_argument("--follower-fault-secs", type=float, default=10.0)
    ap.add_argument("--after-secs", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=int, default=1500)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--write-via", choices=["majority", "all"], default="majority",
                    help="majority: writers pause on the node under fault (the brief's schedule); "
                         "all: they keep writing through it too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("partition_bench.py needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables", "iptables-restore"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: run scripts/bootstrap.sh")
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin} not found: cargo build first")

    def on_alarm(*_):
        raise TimeoutError("--max-seconds reached")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.max_seconds)
    tmp = tempfile.mkdtemp(prefix="pvh-partition-bench-")
    results = []
    try:
        for kind in args.faults.split(","):
            log(f"fault kind {kind}: {args.runs} runs")
            results.append(run_kind(kind, args, tmp, args.bin))
    finally:
        signal.alarm(0)
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nbinary {args.bin}; writes via {args.write_via}; {args.runs} runs per fault kind, "
          f"{args.runs_per_cluster} per cluster; fault held "
          f"{args.fault_secs:g} s (isolated follower {args.follower_fault_secs:g} s); "
          f"watched {args.after_secs:g} s after the heal; times in seconds\n")
    print("| fault | runs | writes again p50 | p99 (max) | isolated leader quorum:false p50 / max "
          "| longest write gap after heal | longest gap during fault | write latency p50 / p99, no fault "
          "| unexpected term changes "
          "| proxy errors, majority side | proxy errors, faulty node | consistency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rec, qf = r["recovery"], r["quorum_false"]
        verdict = ("OK" if r["missing"] == 0 and r["applied_refused"] == 0 else "FAIL") + \
            f": {r['acked']} acked / {r['writes']} writes, {r['missing']} acked missing, " \
            f"{r['refused']} refused of which {r['applied_refused']} applied"
        print(f"| {r['kind']} | {r['runs']} | {fmt(pct(rec, 50)) if rec else '-'} "
              f"| {fmt(pct(rec, 99)) if rec else '-'} "
              f"| {(fmt(pct(qf, 50)) + ' / ' + fmt(max(qf))) if qf else '-'} "
              f"| {fmt(max(r['gap_heal']))} "
              f"| {fmt(max(r['gap_fault'])) if r['gap_fault'] else '-'} "
              f"| {fmt(pct(r['baseline'], 50))} / {fmt(pct(r['baseline'], 99))} "
              f"| {r['term_changes']} | {r['proxy_errors'] or 0} | {r['faulty_proxy_errors'] or 0} "
              f"| {verdict} |")
    if any(r["recovery"] for r in results):
        allrec = [x for r in results for x in r["recovery"]]
        print(f"\nall leader faults: writes again p50 {fmt(statistics.median(allrec))} s, "
              f"p99 {fmt(pct(allrec, 99))} s over {len(allrec)} runs")


if __name__ == "__main__":
    main()

//! Real network namespaces for partition tests: each node gets its own namespace with one
//! veth into a bridge that lives in a namespace of its own; the test process (root
//! namespace) has a veth on that bridge too, so it reaches every node's API and proxy and its
//! in-process backends are reachable from the nodes. A partition is real packet loss:
//! iptables `DROP` rules inside a node's namespace.
//!
//! Layout for subnet `10.77.S.0/24` (S unique among the live test processes):
//!
//! ```text
//!  root ns: pvh<pid>h<k> 10.77.S.254 ─┐
//!                                      ├─ bridge ns <p>-br: bridge br0 (no address)
//!  <p>-n1: eth0 10.77.S.1 ────────────┤
//!  <p>-n2: eth0 10.77.S.2 ────────────┤
//!  <p>-n3: eth0 10.77.S.3 ────────────┘
//! ```
//!
//! Needs root, `ip` (iproute2) and `iptables` (scripts/bootstrap.sh installs them). Nothing is
//! skipped: if a namespace cannot be made, the test fails with the command's error. Names
//! carry the test process's pid; namespaces left by a process that no longer runs are removed
//! before new ones are made, and [`Netns`] removes its own on drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

const NS_PREFIX: &str = "pvh";

/// One test's namespaces.
pub struct Netns {
    /// `pvh<pid>-<k>`: every namespace of this set starts with it.
    prefix: String,
    subnet: u8,
    nodes: usize,
    host_if: String,
}

/// Runs `cmd args`, panicking with its output if it fails.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmd} {}`: {e}", args.join(" ")));
    if !out.status.success() {
        panic!(
            "`{cmd} {}` failed ({}): {}{}\nnetwork-namespace tests need root, iproute2 and \
             iptables (scripts/bootstrap.sh)",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Serializes namespace setup between test processes (subnet choice).
struct SetupLock(std::fs::File);
impl SetupLock {
    fn take() -> SetupLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/pvh-netns.lock")
            .expect("open /tmp/pvh-netns.lock");
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock /tmp/pvh-netns.lock");
        SetupLock(f)
    }
}
impl Drop for SetupLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The pid in a name made by [`Netns`] (`pvh<pid>-...` or `pvh<pid>h<k>`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and root-side links left by test processes that no longer run.
fn remove_stale() {
    for line in ip(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if owner_pid(name).is_some_and(|p| !alive(p)) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    for line in ip(&["-o", "link", "show"]).lines() {
        // "12: pvh123h0@if3: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or("");
        if owner_pid(name).is_some_and(|p| !alive(p)) {
            let _ = Command::new("ip").args(["link", "del", name]).status();
        }
    }
}

/// A subnet `10.77.S.0/24` no root-namespace address uses yet.
fn free_subnet() -> u8 {
    let used = ip(&["-4", "-o", "addr", "show"]);
    (1..=250u8)
        .find(|s| !used.contains(&format!(" 10.77.{s}.")))
        .expect("no free 10.77.S.0/24 subnet")
}

/// One namespaced cluster at a time in this test process: two at once (six debug-build nodes
/// on a 2-core machine) slow each other's writes enough to blur the timings the tests check.
/// Hold the guard for the whole test.
pub async fn netns_turn() -> tokio::sync::OwnedMutexGuard<()> {
    static TURN: OnceLock<Arc<tokio::sync::Mutex<()>>> = OnceLock::new();
    TURN.get_or_init(Default::default)
        .clone()
        .lock_owned()
        .await
}

impl Netns {
    /// Makes `nodes` node namespaces (10.77.S.1..=nodes) on one bridge, plus the root veth
    /// 10.77.S.254. Panics (never skips) if anything fails.
    pub fn create(nodes: usize) -> Netns {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let _lock = SetupLock::take();
        remove_stale();
        let subnet = free_subnet();
        let net = Netns {
            prefix: format!("{NS_PREFIX}{pid}-{k}"),
            subnet,
            nodes,
            host_if: format!("{NS_PREFIX}{pid}h{k}"),
        };
        assert!(net.host_if.len() <= 15, "interface name too long");
        let br = net.bridge_ns();
        ip(&["netns", "add", &br]);
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 1..=nodes as u64 {
            let ns = net.node_ns(i);
            let port = format!("p{i}");
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{}/24", net.node_ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        // The test process's own leg on the bridge.
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "host",
            "type",
            "veth",
            "peer",
            "name",
            &net.host_if,
            "netns",
            "1",
        ]);
        ip(&["-n", &br, "link", "set", "host", "master", "br0", "up"]);
        let host_addr = format!("{}/24", net.host_ip());
        ip(&["addr", "add", &host_addr, "dev", &net.host_if]);
        ip(&["link", "set", &net.host_if, "up"]);
        net
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// The namespace node `i` (1-based) runs in.
    pub fn node_ns(&self, i: u64) -> String {
        format!("{}-n{i}", self.prefix)
    }

    pub fn node_ip(&self, i: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, i as u8)
    }

    /// The test process's address on the bridge (clients, backends).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    /// An address on the host leg with a port the kernel picks (bind it to serve a backend).
    pub fn host_any_port(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host_ip()), 0)
    }

    /// Runs a command inside node `i`'s namespace; panics if it fails.
    pub fn exec(&self, i: u64, args: &[&str]) -> String {
        let ns = self.node_ns(i);
        let mut all = vec!["netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Cuts node `i` off from every other node, both ways (real packet drops, so TCP
    /// connections hang and retransmit as in a real partition). Clients and backends on the
    /// host leg still reach it, and it them. All rules apply at once (`iptables-restore`).
    pub fn isolate(&self, i: u64) {
        let mut rules = String::from("*filter\n");
        for peer in (1..=self.nodes as u64).filter(|p| *p != i) {
            let peer = self.node_ip(peer);
            rules.push_str(&format!(
                "-A INPUT -s {peer} -j DROP\n-A OUTPUT -d {peer} -j DROP\n"
            ));
        }
        rules.push_str("COMMIT\n");
        let ns = self.node_ns(i);
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.as_str(),
                "iptables-restore",
                "--noflush",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run iptables-restore");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .expect("write iptables rules");
        let status = child.wait().expect("wait for iptables-restore");
        assert!(
            status.success(),
            "iptables-restore in {ns} failed: {status}"
        );
    }

    /// Removes node `i`'s partition rules.
    pub fn heal(&self, i: u64) {
        self.exec(i, &["iptables", "-F", "INPUT"]);
        self.exec(i, &["iptables", "-F", "OUTPUT"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends and so their peers (the root leg too).
        for i in 1..=self.nodes as u64 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.node_ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge_ns()])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

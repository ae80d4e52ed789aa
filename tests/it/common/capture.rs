//! A packet capture on the loopback interface (what `tcpdump -i lo` sees), for checking what
//! really crosses the wire between nodes. An `AF_PACKET` socket: needs root (CAP_NET_RAW).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// TCP payloads seen on `lo`, by direction (source port, destination port), in capture order.
pub type Flows = BTreeMap<(u16, u16), Vec<u8>>;

pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Flows, u32)>>,
}

impl Capture {
    /// Starts recording the TCP payload of every loopback packet from or to one of `ports`.
    pub fn tcp_on_loopback(ports: &[u16]) -> Capture {
        let ports: HashSet<u16> = ports.iter().copied().collect();
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: plain socket calls on a descriptor this function owns.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "packet capture needs root (CAP_NET_RAW): {}",
            std::io::Error::last_os_error()
        );
        unsafe {
            let ifindex = libc::if_nametoindex(c"lo".as_ptr());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind to lo: {}", std::io::Error::last_os_error());
            let buf: libc::c_int = 64 << 20;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &buf as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut flows = Flows::new();
            let mut frame = vec![0u8; 1 << 17];
            while !flag.load(Ordering::Relaxed) {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: the buffer and address outlive the call; sizes are theirs.
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        frame.as_mut_ptr() as *mut libc::c_void,
                        frame.len(),
                        0,
                        &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                        &mut len,
                    )
                };
                // Loopback shows each packet twice (sent and received): keep the received copy.
                if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                if let Some((src, dst, payload)) = tcp_payload(&frame[..n as usize]) {
                    if !payload.is_empty() && (ports.contains(&src) || ports.contains(&dst)) {
                        flows
                            .entry((src, dst))
                            .or_default()
                            .extend_from_slice(payload);
                    }
                }
            }
            let mut stats = [0u32; 2];
            let mut len = std::mem::size_of_val(&stats) as u32;
            // SAFETY: PACKET_STATISTICS fills two u32 (packets, drops).
            unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_PACKET,
                    libc::PACKET_STATISTICS,
                    stats.as_mut_ptr() as *mut libc::c_void,
                    &mut len,
                );
                libc::close(fd);
            }
            (flows, stats[1])
        });
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the flows, and how many packets the kernel dropped (buffer full).
    pub fn finish(mut self) -> (Flows, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finish once")
            .join()
            .expect("capture thread")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// (source port, destination port, payload) of an Ethernet + IPv4 + TCP frame.
fn tcp_payload(frame: &[u8]) -> Option<(u16, u16, &[u8])> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    // 0 for a segmentation-offload packet larger than 64 KiB: then the frame's length.
    let total = match usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])) {
        0 => ip.len(),
        n => n,
    };
    let tcp = ip.get(ihl..total.min(ip.len()))?;
    let src = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some((src, dst, tcp.get(offset..)?))
}

/// Does `needle` occur in `haystack`?
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

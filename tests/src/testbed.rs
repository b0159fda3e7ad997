//! End-to-end test bed: real hosts in network namespaces joined by veth pairs.
//!
//! ```text
//!  client ns ──c0/eth0── LB node ns ──b1/eth0── backend 1 ns (VIPs on lo, xlb decap on eth0)
//!  192.0.2.100-199       192.0.2.1     ├─b2/eth0── backend 2 ns
//!  2001:db8:c::100     (XDP on eth0)   └─b3/eth0── backend 3 ns …
//! ```
//!
//! VIPs live in 203.0.113.0/24 and 2001:db8:f::/64, routed by the client to the LB node. The
//! LB node encapsulates toward the backend (XDP_REDIRECT to b<i>); the backend strips the
//! tunnel and answers the client directly through its default route (the LB node's kernel
//! forwards that return traffic, as a router would). Every address is in a documentation
//! range and exists only inside these namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::programs::XdpMode;
use lb_common::{
    Backend, DatapathConfig, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VipAddrKey, VipInfo,
    VipKey, program_names,
};
use lb_userspace::datapath::{Datapath, LoadOptions};
use lb_userspace::maglev::{self, WeightedBackend};

use crate::netns::{NetNs, PinDir};
use crate::packets::addr_words;

/// The IPv4 VIP used by the test bed.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The IPv6 VIP used by the test bed.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
/// The LB node's address on the client side.
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const LB_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);

/// Test-bed size.
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    pub backends: usize,
    /// Extra client source addresses (192.0.2.100 + i).
    pub client_addresses: usize,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        Self {
            backends: 3,
            client_addresses: 50,
        }
    }
}

/// One backend host.
pub struct BackendHost {
    pub ns: NetNs,
    /// 1-based index.
    pub index: usize,
    /// Tunnel endpoint address (eth0).
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
}

/// The topology; namespaces are deleted when it drops.
pub struct Testbed {
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<BackendHost>,
    pub client_addrs: Vec<Ipv4Addr>,
    pub client_addr6: Ipv6Addr,
}

fn sysctl(ns: &NetNs, kv: &str) {
    ns.exec(&["sysctl", "-qw", kv]);
}

impl Testbed {
    pub fn new(opts: &TestbedOptions) -> Self {
        crate::require_root();
        let client = NetNs::new("xcl");
        let lb = NetNs::new("xlb");
        for ns in [&client, &lb] {
            sysctl(ns, "net.ipv6.conf.all.accept_dad=0");
            sysctl(ns, "net.ipv6.conf.default.accept_dad=0");
        }
        // client <-> LB node
        client.ip(&[
            "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", &lb.name,
        ]);
        let client_addrs: Vec<Ipv4Addr> = (0..opts.client_addresses.max(1))
            .map(|i| Ipv4Addr::new(192, 0, 2, 100 + i as u8))
            .collect();
        for a in &client_addrs {
            client.ip(&["addr", "add", &format!("{a}/24"), "dev", "c0"]);
        }
        let client_addr6 = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x100);
        client.ip(&[
            "addr",
            "add",
            &format!("{client_addr6}/64"),
            "dev",
            "c0",
            "nodad",
        ]);
        client.ip(&["link", "set", "c0", "up"]);
        client.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.1"]);
        client.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:f::/64",
            "via",
            "2001:db8:c::1",
        ]);
        lb.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
        lb.ip(&["addr", "add", "2001:db8:c::1/64", "dev", "eth0", "nodad"]);
        lb.ip(&["link", "set", "eth0", "up"]);
        for kv in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
        ] {
            sysctl(&lb, kv);
        }

        let mut backends = Vec::new();
        for index in 1..=opts.backends {
            let ns = NetNs::new(&format!("xb{index}-"));
            sysctl(&ns, "net.ipv6.conf.all.accept_dad=0");
            sysctl(&ns, "net.ipv4.conf.all.rp_filter=0");
            sysctl(&ns, "net.ipv4.conf.default.rp_filter=0");
            let lb_if = format!("b{index}");
            lb.ip(&[
                "link", "add", &lb_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            let lb_side = Ipv4Addr::new(198, 51, 100, (index * 4 + 1) as u8);
            let addr = Ipv4Addr::new(198, 51, 100, (index * 4 + 2) as u8);
            let lb_side6 = Ipv6Addr::new(0x2001, 0xdb8, 0xb, index as u16, 0, 0, 0, 1);
            let addr6 = Ipv6Addr::new(0x2001, 0xdb8, 0xb, index as u16, 0, 0, 0, 2);
            lb.ip(&["addr", "add", &format!("{lb_side}/30"), "dev", &lb_if]);
            lb.ip(&[
                "addr",
                "add",
                &format!("{lb_side6}/64"),
                "dev",
                &lb_if,
                "nodad",
            ]);
            lb.ip(&["link", "set", &lb_if, "up"]);
            sysctl(&lb, &format!("net.ipv4.conf.{lb_if}.rp_filter=0"));
            ns.ip(&["addr", "add", &format!("{addr}/30"), "dev", "eth0"]);
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
            sysctl(&ns, "net.ipv4.conf.eth0.rp_filter=0");
            ns.ip(&["route", "add", "default", "via", &lb_side.to_string()]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &lb_side6.to_string(),
            ]);
            // The VIPs are local on every backend (direct server return).
            ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
            ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"]);
            // XDP's FIB lookup never resolves neighbours itself: keep them resolved.
            lb.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "dev",
                &lb_if,
                "managed",
            ]);
            lb.ip(&[
                "-6",
                "neigh",
                "replace",
                &addr6.to_string(),
                "dev",
                &lb_if,
                "managed",
            ]);
            // Rewritten packets lose CHECKSUM_PARTIAL on the XDP path.
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
            lb.exec(&["ethtool", "-K", &lb_if, "tx", "off"]);
            backends.push(BackendHost {
                ns,
                index,
                addr,
                addr6,
            });
        }
        client.exec(&["ethtool", "-K", "c0", "tx", "off"]);
        lb.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
        Self {
            client,
            lb,
            backends,
            client_addrs,
            client_addr6,
        }
    }

    /// Waits until every managed neighbour entry on the LB node is resolved.
    pub fn wait_for_neighbours(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v4 = self.lb.ip(&["neigh", "show"]);
            let v6 = self.lb.ip(&["-6", "neigh", "show"]);
            let ready = self.backends.iter().all(|b| {
                let ok = |table: &str, addr: String| {
                    table
                        .lines()
                        .any(|l| l.starts_with(&format!("{addr} ")) && l.contains("lladdr"))
                };
                ok(&v4, b.addr.to_string()) && ok(&v6, b.addr6.to_string())
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "neighbours not resolved:\n{v4}\n{v6}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `f` on a short-lived thread inside `ns` (sockets keep the namespace they were
/// created in, so they can be used from any thread afterwards).
pub fn in_ns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on a valid fd affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A TCP and UDP server on a backend: answers each request line with `backend-<index>`.
/// Long-lived connections get one answer per line for as long as they stay open.
pub struct BackendServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    pub fn start(host: &BackendHost, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let name = format!("backend-{}", host.index);
        // Dual-stack sockets on [::] serve IPv4 (as mapped addresses) and IPv6 alike.
        let (tcp, udp) = in_ns(&host.ns, move || {
            (
                TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind tcp"),
                UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind udp"),
            )
        });
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let tcp_thread = {
            let (stop, name) = (stop.clone(), name.clone());
            std::thread::spawn(move || accept_loop(tcp, stop, name))
        };
        let udp_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(name.as_bytes(), peer);
                    }
                }
            })
        };
        Self {
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, name: String) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (stop, name) = (stop.clone(), name.clone());
                std::thread::spawn(move || serve(stream, stop, name));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve(stream: TcpStream, stop: Arc<AtomicBool>, name: String) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if let Some(count) = line.strip_prefix("UPLOAD ") {
                    // "UPLOAD n": read n bytes, answer with the count (client-to-server MTU).
                    let n: usize = count.trim().parse().unwrap_or(0);
                    let mut got = 0;
                    let mut buf = vec![0u8; 64 * 1024];
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while got < n && Instant::now() < deadline {
                        match reader.read(&mut buf) {
                            Ok(0) => return,
                            Ok(k) => got += k,
                            Err(_) => continue,
                        }
                    }
                    if writer
                        .write_all(format!("{name} {got}\n").as_bytes())
                        .is_err()
                    {
                        return;
                    }
                } else if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens a TCP connection from the client namespace, bound to `src`, with a timeout.
pub fn connect_from(client: &NetNs, src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    in_ns(client, move || connect_here(src, 0, dst))
}

/// Opens a TCP connection from `src:sport` (0 = ephemeral) in the calling thread's
/// namespace. Closing it sends a RST (linger 0), so the same 4-tuple can be reused at once
/// (no TIME_WAIT), which the flow-movement scenarios need.
pub fn connect_here(src: IpAddr, sport: u16, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let socket = socket2_like::tcp_socket(domain)?;
    socket2_like::linger_zero(&socket);
    socket2_like::bind(&socket, SocketAddr::new(src, sport))?;
    let stream = socket2_like::connect_timeout(socket, dst, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    Ok(stream)
}

/// One short request from `src:sport` in the calling thread's namespace.
pub fn tcp_request_here(src: IpAddr, sport: u16, dst: SocketAddr) -> std::io::Result<String> {
    let mut s = connect_here(src, sport, dst)?;
    ask(&mut s)
}

/// Sends one request line and reads the answer line (`backend-N`).
pub fn ask(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"who\n")?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 64 {
        match stream.read(&mut byte)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// One short TCP request from `src`: connect, ask, close.
pub fn tcp_request(client: &NetNs, src: IpAddr, dst: SocketAddr) -> std::io::Result<String> {
    let mut s = connect_from(client, src, dst)?;
    ask(&mut s)
}

/// One UDP request from `src:sport` (0 = any port).
pub fn udp_request(client: &NetNs, src: SocketAddr, dst: SocketAddr) -> std::io::Result<String> {
    let socket = in_ns(client, move || UdpSocket::bind(src))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"who", dst)?;
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Minimal socket calls with libc (bind before connect, connect with a timeout).
mod socket2_like {
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Duration;

    pub fn tcp_socket(domain: i32) -> std::io::Result<OwnedFd> {
        // SAFETY: plain socket(2) call; the fd is owned immediately.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain data, large enough for both families.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }

    pub fn linger_zero(fd: &OwnedFd) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd; SO_LINGER with a properly sized struct.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const _,
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
    }

    pub fn bind(fd: &OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let (sa, len) = sockaddr(addr);
        // SAFETY: valid fd and sockaddr of the given length.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn connect_timeout(
        fd: OwnedFd,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let raw = fd.as_raw_fd();
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as i64,
            tv_usec: 0,
        };
        // SAFETY: setting SO_SNDTIMEO bounds a blocking connect(2).
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                &tv as *const _ as *const _,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let (sa, len) = sockaddr(dst);
        // SAFETY: valid fd and sockaddr.
        if unsafe { libc::connect(raw, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
    }
}

/// Maglev table size used by the test bed.
pub const M: u32 = 65_537;

pub fn small_load_options(pins: &PinDir) -> LoadOptions {
    LoadOptions {
        pin_dir: pins.path.clone(),
        maglev_table_size: M,
        max_vips: 8,
        max_backends: 64,
        conntrack_entries: 65_536,
    }
}

/// Loads the balancer in the LB namespace, attaches it to eth0 (native XDP), and programs one
/// TCP and one UDP VIP on each address family over the backends with the given weights.
pub fn start_balancer(bed: &Testbed, pins: &PinDir, weights: &[u32]) -> Datapath {
    let opts = small_load_options(pins);
    let backends: Vec<(IpAddr, IpAddr, u32)> = bed
        .backends
        .iter()
        .zip(weights)
        .map(|(b, w)| (IpAddr::V4(b.addr), IpAddr::V6(b.addr6), *w))
        .collect();
    in_ns(&bed.lb, move || {
        let mut dp = Datapath::load(&opts).expect("load datapath");
        dp.attach(program_names::BALANCER, "eth0", XdpMode::Driver)
            .expect("attach balancer");
        let cfg = DatapathConfig {
            maglev_table_size: M,
            new_conn_rate_limit: 0,
            udp_idle_timeout_ns: 30_000_000_000,
            tunnel_src_v4_be: addr_words(IpAddr::V4(LB_CLIENT_SIDE))[0],
            fallback_mtu: 1500,
            tunnel_src_v6_be: addr_words(IpAddr::V6(LB_CLIENT_SIDE6)),
            gateway_mac: [0; 6],
            _pad: [0; 2],
        };
        dp.maps.set_config(&cfg).unwrap();
        // Backend ids: IPv4 i, IPv6 32 + i.
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (i, (a4, a6, w)) in backends.iter().enumerate() {
            let id4 = i as u32 + 1;
            let id6 = 32 + i as u32 + 1;
            dp.maps
                .backends
                .set(
                    id4,
                    &Backend {
                        addr_be: addr_words(*a4),
                        family: FAMILY_V4,
                        _pad: [0; 3],
                    },
                    0,
                )
                .unwrap();
            dp.maps
                .backends
                .set(
                    id6,
                    &Backend {
                        addr_be: addr_words(*a6),
                        family: FAMILY_V6,
                        _pad: [0; 3],
                    },
                    0,
                )
                .unwrap();
            v4.push(WeightedBackend {
                address: *a4,
                weight: *w,
                id: id4,
            });
            v6.push(WeightedBackend {
                address: *a6,
                weight: *w,
                id: id6,
            });
        }
        let vips = [
            (IpAddr::V4(VIP4), 80u16, PROTO_TCP, &v4),
            (IpAddr::V4(VIP4), 53, PROTO_UDP, &v4),
            (IpAddr::V6(VIP6), 80, PROTO_TCP, &v6),
            (IpAddr::V6(VIP6), 53, PROTO_UDP, &v6),
        ];
        for (vip_id, (addr, port, proto, set)) in vips.iter().enumerate() {
            let table = maglev::build(&format!("{addr}:{port}"), M, set)
                .expect("maglev")
                .table;
            let ring = 2 * vip_id as u32;
            dp.maps.maglev.write_ring(ring, &table).unwrap();
            let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
            let key = VipKey {
                addr_be: addr_words(*addr),
                port_be: port.to_be(),
                proto: *proto,
                family,
            };
            dp.maps
                .vips
                .insert(
                    &key,
                    &VipInfo {
                        vip_id: vip_id as u32,
                        ring,
                        flags: 0,
                        _pad: 0,
                    },
                    0,
                )
                .unwrap();
            let akey = VipAddrKey {
                addr_be: addr_words(*addr),
                family,
                _pad: [0; 3],
            };
            let n = dp.maps.vip_addrs.get(&akey, 0).unwrap_or(0);
            dp.maps.vip_addrs.insert(&akey, &(n + 1), 0).unwrap();
        }
        dp
    })
}

/// Attaches the decapsulator on every backend's eth0 and, on the client, the pass program
/// (native XDP_TX toward a veth is delivered only when its peer runs an XDP program).
pub fn start_decap_and_peers(bed: &Testbed) -> Vec<(PinDir, Datapath)> {
    let mut held = Vec::new();
    for b in &bed.backends {
        let pins = PinDir::new(&format!("decap{}", b.index));
        let mut opts = small_load_options(&pins);
        opts.maglev_table_size = 3;
        let (a4, a6) = (b.addr, b.addr6);
        let dp = in_ns(&b.ns, move || {
            let mut dp = Datapath::load(&opts).expect("load decap");
            dp.attach(program_names::DECAP, "eth0", XdpMode::Driver)
                .expect("attach decap");
            for addr in [IpAddr::V4(a4), IpAddr::V6(a6)] {
                let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
                dp.maps
                    .decap_addrs
                    .insert(
                        &VipAddrKey {
                            addr_be: addr_words(addr),
                            family,
                            _pad: [0; 3],
                        },
                        &1,
                        0,
                    )
                    .unwrap();
            }
            dp
        });
        held.push((pins, dp));
    }
    let pins = PinDir::new("clientpass");
    let mut opts = small_load_options(&pins);
    opts.maglev_table_size = 3;
    let dp = in_ns(&bed.client, move || {
        let mut dp = Datapath::load(&opts).expect("load pass");
        dp.attach(program_names::PASS, "c0", XdpMode::Driver)
            .expect("attach pass");
        dp
    });
    held.push((pins, dp));
    held
}

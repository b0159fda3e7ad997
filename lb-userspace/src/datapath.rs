//! The kernel side as seen from userspace: loading the embedded eBPF object, pinning and
//! adopting its maps, typed access to every map, attaching programs, and test runs.
//!
//! This is the one place that knows map names and layouts; the agent, the CLI and the
//! tests all go through it.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    Backend, BackendStats, ClockCache, DatapathConfig, DatapathStats, DecapStats, FlowKey,
    FlowKeyV4, FlowState, NextHop, RateGuard, VipAddrKey, VipInfo, VipKey, VipStats, map_names,
    program_names,
};
use thiserror::Error;

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJECT_PATH"));

/// Default bpffs directory for xlb's pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Errors from the datapath layer. Each names the map or program involved.
#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a bpffs; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("maglev ring {ring} is out of range (the map holds {rings} rings of {size})")]
    RingOutOfRange { ring: u32, rings: u32, size: u32 },
    #[error("maglev table has {got} entries, the datapath was loaded with M = {want}")]
    TableSize { got: usize, want: u32 },
    #[error("mapping {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {iface}: {reason}")]
    Interface { iface: String, reason: String },
    #[error("pinned link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("waiting for an RCU grace period: {0}")]
    GracePeriod(std::io::Error),
    #[error("no xlb datapath is pinned at {path} (is the agent running? see --pin-dir)")]
    NotPinned { path: PathBuf },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Sizes fixed at load time. Changing them needs `xlb unload` (the maps are re-created).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// bpffs directory where maps are pinned (created if missing) and adopted from.
    pub pin_dir: PathBuf,
    /// Maglev table size M (prime).
    pub maglev_table_size: u32,
    /// Number of VIP ids; the Maglev map holds two rings per VIP.
    pub max_vips: u32,
    /// Number of backend ids (id 0 unused).
    pub max_backends: u32,
    /// Entries of each connection table (one for IPv4 flows, one for IPv6 flows).
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            maglev_table_size: lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
            max_vips: lb_common::limits::MAX_VIPS,
            max_backends: lb_common::limits::MAX_BACKENDS,
            conntrack_entries: lb_common::limits::CONNTRACK_ENTRIES,
        }
    }
}

/// Typed handles on every map, from a fresh load or from the pins of a running datapath.
pub struct Maps {
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    pub vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    pub backends: Array<MapData, Backend>,
    pub maglev: MaglevRings,
    pub conntrack: Conntrack,
    pub config: Array<MapData, DatapathConfig>,
    pub stats: PerCpuArray<MapData, DatapathStats>,
    pub vip_stats: PerCpuArray<MapData, VipStats>,
    pub backend_stats: PerCpuArray<MapData, BackendStats>,
    pub decap_addrs: HashMap<MapData, VipAddrKey, u32>,
    pub decap_stats: PerCpuArray<MapData, DecapStats>,
    pub nexthop: PerCpuArray<MapData, NextHop>,
    pub rate_guard: PerCpuArray<MapData, RateGuard>,
    pub clock: PerCpuArray<MapData, ClockCache>,
    /// Created by this process (not adopted) with the backend and connection maps: every
    /// next-hop entry above this backend id is still all zeros (no backend, ring or flow
    /// ever named it), so assigning it needs no clearing — on a first sync of 100,000
    /// backends that is 100,000 syscalls. `None`: adopted maps, always clear.
    nexthop_zero_above: Option<u32>,
}

/// A loaded datapath: the programs and the maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    pin_dir: PathBuf,
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The XDP verdict.
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Kernel-reported run time.
    pub duration: std::time::Duration,
}

/// True if `path` (or its nearest existing ancestor) is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            return false;
        }
    }
    let Ok(cpath) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(cpath.as_ptr(), &mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

/// The loader for xlb's objects with `opts`' map sizes and pin directory: a second object
/// loaded this way (a profiling build of `lb-ebpf`) shares the maps of the running one.
pub fn loader(opts: &LoadOptions) -> EbpfLoader<'static> {
    let maglev_entries = 2 * opts.max_vips * opts.maglev_table_size;
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(&opts.pin_dir)
        .map_max_entries(map_names::VIPS, opts.max_vips)
        .map_max_entries(map_names::VIP_ADDRS, opts.max_vips)
        .map_max_entries(map_names::VIP_STATS, opts.max_vips)
        .map_max_entries(map_names::BACKENDS, opts.max_backends)
        .map_max_entries(map_names::BACKEND_STATS, opts.max_backends)
        // Indexed by backend id like the two above (its 4096 in the object is a default).
        .map_max_entries(map_names::NEXTHOP, opts.max_backends)
        .map_max_entries(map_names::MAGLEV, maglev_entries)
        .map_max_entries(map_names::CONNTRACK, opts.conntrack_entries)
        .map_max_entries(map_names::CONNTRACK4, opts.conntrack_entries);
    loader
}

impl Datapath {
    /// Loads the embedded object. Maps already pinned under `opts.pin_dir` are adopted
    /// (their contents and counters continue); missing ones are created and pinned.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        if !is_bpffs(&opts.pin_dir) {
            return Err(DatapathError::NotBpffs {
                path: opts.pin_dir.clone(),
            });
        }
        std::fs::create_dir_all(&opts.pin_dir).map_err(|source| DatapathError::PinDir {
            path: opts.pin_dir.clone(),
            source,
        })?;
        let fresh = [
            map_names::NEXTHOP,
            map_names::BACKENDS,
            map_names::CONNTRACK,
            map_names::CONNTRACK4,
        ]
        .iter()
        .all(|name| !opts.pin_dir.join(name).exists());
        // Pins of a datapath from before the IPv4 connection table: its IPv4 flows are in
        // the IPv6 table, where the new program no longer looks.
        let move_v4_flows = opts.pin_dir.join(map_names::CONNTRACK).exists()
            && !opts.pin_dir.join(map_names::CONNTRACK4).exists();
        let mut ebpf = loader(opts).load(EBPF_OBJECT)?;
        for name in [
            program_names::BALANCER,
            program_names::DECAP,
            program_names::PASS,
        ] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut maps = Maps::take_from(&mut ebpf, opts.maglev_table_size)?;
        if fresh {
            maps.nexthop_zero_above = Some(0);
        }
        if move_v4_flows {
            let moved = maps.conntrack.move_v4_from_v6_table()?;
            tracing::info!(moved, "IPv4 connection entries moved to their own table");
        }
        Ok(Self {
            ebpf,
            maps,
            pin_dir: opts.pin_dir.clone(),
        })
    }

    /// The pin directory the maps live in.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// One of the object's XDP programs.
    pub fn program(&self, name: &'static str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// One of the object's XDP programs, mutably (to attach it).
    pub fn program_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Attaches `program` to `iface` and returns the link id.
    pub fn attach(
        &mut self,
        program: &'static str,
        iface: &str,
        mode: XdpMode,
    ) -> Result<aya::programs::xdp::XdpLinkId> {
        let iface_c = std::ffi::CString::new(iface).map_err(|_| DatapathError::Program {
            name: program,
            source: aya::programs::ProgramError::UnknownInterface {
                name: std::ffi::CString::default(),
            },
        })?;
        self.program_mut(program)?
            .attach(iface_c.as_c_str(), mode)
            .map_err(|source| DatapathError::Program {
                name: program,
                source,
            })
    }

    /// Runs `program` once on `packet` with BPF_PROG_TEST_RUN. With `ingress_ifindex`, the
    /// run sees that interface (in the calling thread's network namespace) as its ingress,
    /// so `bpf_fib_lookup` resolves routes and neighbours there.
    pub fn test_run(
        &self,
        program: &'static str,
        packet: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<TestRunOutput> {
        run_xdp_test(self.program(program)?, program, packet, ingress_ifindex)
    }
}

/// How to attach an XDP program (the config's `node.xdp_mode`, the CLI's `--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver; fail if the driver cannot.
    Native,
    /// In the generic (skb) path.
    Generic,
    /// Native, else generic with a warning.
    Auto,
}

impl From<crate::config::XdpMode> for AttachMode {
    fn from(mode: crate::config::XdpMode) -> Self {
        match mode {
            crate::config::XdpMode::Native => AttachMode::Native,
            crate::config::XdpMode::Generic => AttachMode::Generic,
            crate::config::XdpMode::Auto => AttachMode::Auto,
        }
    }
}

/// What [`Datapath::attach_pinned`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A pinned link existed: its program was replaced atomically (`bpf_link_update`), so
    /// the interface never ran without a program.
    Adopted,
    /// A new link was created in native mode and pinned.
    Native,
    /// A new link was created in generic mode and pinned. `native_error` says why native
    /// failed when the mode was `auto`.
    Generic { native_error: Option<String> },
}

/// Where the link of `program` on `iface` is pinned.
pub fn link_pin_path(pin_dir: &Path, program: &str, iface: &str) -> PathBuf {
    pin_dir.join(format!("link_{program}_{iface}"))
}

/// Prefix of every link pin (see [`link_pin_path`]).
const LINK_PIN_PREFIX: &str = "link_";

/// Name of the symlink in the pin directory that points at the agent's state file
/// (bpffs holds no regular files, but it does hold symlinks; names with a dot are refused).
pub const STATE_LINK_NAME: &str = "agent_state";

impl Datapath {
    /// Attaches `program` to `iface` through a BPF link pinned under the pin directory, so
    /// the program stays attached after this process exits.
    ///
    /// If the link is already pinned (an agent ran before), the program in that link is
    /// replaced atomically by this load's program, which uses the same pinned maps:
    /// no packet sees the interface without a program and no flow is dropped. A pin whose
    /// interface has gone (the kernel answers ENOLINK) is removed and a new link made.
    pub fn attach_pinned(
        &mut self,
        program: &'static str,
        iface: &str,
        mode: AttachMode,
    ) -> Result<Attached> {
        let path = link_pin_path(&self.pin_dir, program, iface);
        let link_err = |reason: String| DatapathError::Link {
            path: path.clone(),
            reason,
        };
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(e.to_string()))?;
            let fd_link: FdLink = pinned.into();
            let xdp_link = XdpLink::try_from(fd_link)
                .map_err(|e| link_err(format!("not an XDP link: {e}")))?;
            let prog = self.program_mut(program)?;
            match prog.attach_to_link(xdp_link) {
                Ok(id) => {
                    // Dropping our handle closes only our fd: the pin keeps the link.
                    let link = prog
                        .take_link(id)
                        .map_err(|source| DatapathError::Program {
                            name: program,
                            source,
                        })?;
                    drop(link);
                    return Ok(Attached::Adopted);
                }
                Err(e) => {
                    tracing::warn!(
                        pin = %path.display(),
                        error = %e,
                        "pinned link cannot be updated (interface gone?); replacing it"
                    );
                    std::fs::remove_file(&path).map_err(|e| link_err(e.to_string()))?;
                }
            }
        }
        let iface_c = std::ffi::CString::new(iface).map_err(|_| DatapathError::Interface {
            iface: iface.to_owned(),
            reason: "name contains a NUL byte".into(),
        })?;
        let try_attach = |dp: &mut Datapath, xdp_mode: XdpMode| {
            let prog = dp.program_mut(program)?;
            let id = prog
                .attach(iface_c.as_c_str(), xdp_mode)
                .map_err(|source| match source {
                    aya::programs::ProgramError::UnknownInterface { .. } => {
                        DatapathError::Interface {
                            iface: iface.to_owned(),
                            reason: "no such interface".into(),
                        }
                    }
                    source => DatapathError::Program {
                        name: program,
                        source,
                    },
                })?;
            prog.take_link(id).map_err(|source| DatapathError::Program {
                name: program,
                source,
            })
        };
        let (link, attached) = match mode {
            AttachMode::Native => (try_attach(self, XdpMode::Driver)?, Attached::Native),
            AttachMode::Generic => (
                try_attach(self, XdpMode::Skb)?,
                Attached::Generic { native_error: None },
            ),
            AttachMode::Auto => match try_attach(self, XdpMode::Driver) {
                Ok(link) => (link, Attached::Native),
                Err(DatapathError::Interface { iface, reason }) => {
                    return Err(DatapathError::Interface { iface, reason });
                }
                Err(native) => (
                    try_attach(self, XdpMode::Skb)?,
                    Attached::Generic {
                        native_error: Some(error_chain(&native)),
                    },
                ),
            },
        };
        let fd_link = FdLink::try_from(link).map_err(|e| {
            link_err(format!(
                "the kernel attached through netlink, not a BPF link, so it cannot be pinned: {e}"
            ))
        })?;
        fd_link
            .pin(&path)
            .map_err(|e| link_err(format!("pinning: {e}")))?;
        Ok(attached)
    }
}

/// Detaches a pinned link by removing its pin (the kernel releases the link once no fd
/// refers to it). Returns false if nothing was pinned.
pub fn detach_pinned(pin_dir: &Path, program: &str, iface: &str) -> Result<bool> {
    let path = link_pin_path(pin_dir, program, iface);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(DatapathError::Link {
            path,
            reason: e.to_string(),
        }),
    }
}

/// The interfaces that have a pinned link of `program` under `pin_dir`.
pub fn pinned_links(pin_dir: &Path, program: &str) -> Vec<String> {
    let prefix = format!("{LINK_PIN_PREFIX}{program}_");
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut ifaces: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|name| name.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    ifaces.sort();
    ifaces
}

/// What [`unload`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unloaded {
    /// Link pins removed (each detached a program from an interface).
    pub links: Vec<String>,
    /// Map pins removed.
    pub maps: usize,
}

/// Detaches everything pinned under `pin_dir` and removes the pins, the state file the
/// state symlink points to, and the directory. The maps (and their counters and
/// connection entries) are freed by the kernel once nothing refers to them.
pub fn unload(pin_dir: &Path) -> Result<Unloaded> {
    let pin_err = |source: std::io::Error| DatapathError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    };
    if !pin_dir.join(map_names::VIPS).exists() && !pin_dir.join(map_names::DECAP_ADDRS).exists() {
        return Err(DatapathError::NotPinned {
            path: pin_dir.to_path_buf(),
        });
    }
    let mut done = Unloaded::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(pin_dir)
        .map_err(pin_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    // Links first: the programs leave the interfaces before their maps are unpinned.
    entries.sort_by_key(|p| {
        !p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(LINK_PIN_PREFIX))
    });
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name == STATE_LINK_NAME {
            if let Ok(target) = std::fs::read_link(&path) {
                let _ = std::fs::remove_file(target);
            }
        } else if let Some(link) = name.strip_prefix(LINK_PIN_PREFIX) {
            done.links.push(link.to_owned());
        } else {
            done.maps += 1;
        }
        std::fs::remove_file(&path).map_err(pin_err)?;
    }
    std::fs::remove_dir(pin_dir).map_err(pin_err)?;
    Ok(done)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Waits for an RCU grace period: every XDP program run that started before this call
/// has finished when it returns.
///
/// XDP programs run inside an RCU read-side section. The kernel calls `synchronize_rcu()`
/// after every update of a map-in-map (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c),
/// so updating slot 0 of a private one-slot `BPF_MAP_TYPE_ARRAY_OF_MAPS` is a
/// userspace-callable RCU barrier. The manager calls it before writing into a ring that a
/// packet might still be reading (a ring retired by an earlier `VipInfo.ring` flip).
pub struct GracePeriod {
    outer: std::os::fd::OwnedFd,
    // Kept open: its fd is the value stored into the outer map.
    inner: Array<MapData, u32>,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `#[repr(C)]` prefix of `union bpf_attr`
    // for `cmd`; the kernel reads at most `size_of::<T>()` bytes from it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl GracePeriod {
    /// Creates the private map pair.
    pub fn new() -> Result<Self> {
        let inner = Array::<MapData, u32>::create(1, 0).map_err(map_err("xlb_rcu_inner"))?;
        let inner_fd = inner.map().fd().as_fd().as_raw_fd();
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
            inner_map_fd: inner_fd as u32,
        };
        let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).map_err(DatapathError::GracePeriod)?;
        // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
        let outer =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Ok(Self { outer, inner })
    }

    /// Returns after one RCU grace period.
    pub fn wait(&self) -> Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.map().fd().as_fd().as_raw_fd() as u32;
        let mut attr = MapUpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0,
        };
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(DatapathError::GracePeriod)?;
        Ok(())
    }
}

/// BPF_PROG_TEST_RUN of an XDP program on one packet.
pub fn run_xdp_test(
    prog: &Xdp,
    name: &'static str,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<TestRunOutput> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The kernel wants data = 0 and data_end = the packet length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    if let Some(ifindex) = ingress_ifindex {
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    }
    // Room for the largest growth the programs make (an IPv6 tunnel header).
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: ingress_ifindex.map(|_| &ctx[..]),
        repeat: 1,
        ..Default::default()
    };
    let res = prog
        .test_run(opts)
        .map_err(|source| DatapathError::Program { name, source })?;
    out.truncate(res.data_size_out as usize);
    Ok(TestRunOutput {
        verdict: res.return_value,
        packet: out,
        duration: res.duration,
    })
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

fn from_pin<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl Maps {
    fn take_from(ebpf: &mut Ebpf, table_size: u32) -> Result<Self> {
        Ok(Self {
            vips: take(ebpf, map_names::VIPS)?,
            vip_addrs: take(ebpf, map_names::VIP_ADDRS)?,
            backends: take(ebpf, map_names::BACKENDS)?,
            maglev: MaglevRings::new(take(ebpf, map_names::MAGLEV)?, table_size)?,
            conntrack: Conntrack {
                v4: take(ebpf, map_names::CONNTRACK4)?,
                v6: take(ebpf, map_names::CONNTRACK)?,
            },
            config: take(ebpf, map_names::CONFIG)?,
            stats: take(ebpf, map_names::STATS)?,
            vip_stats: take(ebpf, map_names::VIP_STATS)?,
            backend_stats: take(ebpf, map_names::BACKEND_STATS)?,
            decap_addrs: take(ebpf, map_names::DECAP_ADDRS)?,
            decap_stats: take(ebpf, map_names::DECAP_STATS)?,
            nexthop: take(ebpf, map_names::NEXTHOP)?,
            rate_guard: take(ebpf, map_names::RATE_GUARD)?,
            clock: take(ebpf, map_names::CLOCK)?,
            nexthop_zero_above: None,
        })
    }

    /// Opens the maps pinned by a running datapath (the CLI's view; no program is loaded).
    /// The Maglev table size is read from the pinned config.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        let config: Array<MapData, DatapathConfig> = from_pin(dir, map_names::CONFIG)?;
        let table_size = config
            .get(&0, 0)
            .map_err(map_err(map_names::CONFIG))?
            .maglev_table_size;
        Ok(Self {
            vips: from_pin(dir, map_names::VIPS)?,
            vip_addrs: from_pin(dir, map_names::VIP_ADDRS)?,
            backends: from_pin(dir, map_names::BACKENDS)?,
            maglev: MaglevRings::new(from_pin(dir, map_names::MAGLEV)?, table_size)?,
            conntrack: Conntrack::open_pinned(dir)?,
            config,
            stats: from_pin(dir, map_names::STATS)?,
            vip_stats: from_pin(dir, map_names::VIP_STATS)?,
            backend_stats: from_pin(dir, map_names::BACKEND_STATS)?,
            decap_addrs: from_pin(dir, map_names::DECAP_ADDRS)?,
            decap_stats: from_pin(dir, map_names::DECAP_STATS)?,
            nexthop: from_pin(dir, map_names::NEXTHOP)?,
            rate_guard: from_pin(dir, map_names::RATE_GUARD)?,
            clock: from_pin(dir, map_names::CLOCK)?,
            nexthop_zero_above: None,
        })
    }

    /// The node settings (index 0 of the config map).
    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Writes the node settings.
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    /// Balancer counters summed over CPUs.
    pub fn stats(&self) -> Result<DatapathStats> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err(map_names::STATS))?;
        Ok(per_cpu
            .iter()
            .fold(DatapathStats::default(), |acc, s| sum_stats(&acc, s)))
    }

    /// Decapsulator counters summed over CPUs.
    pub fn decap_stats(&self) -> Result<DecapStats> {
        let per_cpu = self
            .decap_stats
            .get(&0, 0)
            .map_err(map_err(map_names::DECAP_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(DecapStats::default(), |a, s| DecapStats {
                rx_packets: a.rx_packets + s.rx_packets,
                decapsulated: a.decapsulated + s.decapsulated,
                pass_not_tunnel: a.pass_not_tunnel + s.pass_not_tunnel,
                pass_not_local: a.pass_not_local + s.pass_not_local,
                drop_malformed: a.drop_malformed + s.drop_malformed,
            }))
    }

    /// One VIP's counters summed over CPUs.
    pub fn vip_stats(&self, vip_id: u32) -> Result<VipStats> {
        let per_cpu = self
            .vip_stats
            .get(&vip_id, 0)
            .map_err(map_err(map_names::VIP_STATS))?;
        Ok(per_cpu.iter().fold(VipStats::default(), |a, s| VipStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            new_conns: a.new_conns + s.new_conns,
        }))
    }

    /// One backend's counters summed over CPUs.
    pub fn backend_stats(&self, backend_id: u32) -> Result<BackendStats> {
        let per_cpu = self
            .backend_stats
            .get(&backend_id, 0)
            .map_err(map_err(map_names::BACKEND_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |a, s| BackendStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
            }))
    }
}

impl Maps {
    /// Every VIP table entry.
    pub fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIPS))
    }

    /// Every VIP-address entry (address → VIP count).
    pub fn vip_addr_entries(&self) -> Result<Vec<(VipAddrKey, u32)>> {
        self.vip_addrs
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIP_ADDRS))
    }

    /// Every backend id in use (family set), with its entry.
    pub fn backend_entries(&self) -> Result<Vec<(u32, Backend)>> {
        let mut out = Vec::new();
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(map_err(map_names::BACKENDS))?;
            if backend.family != 0 {
                out.push((id as u32, backend));
            }
        }
        Ok(out)
    }

    /// Forgets every CPU's cached next hop of backend `id` (the kernel compares the
    /// address too; this makes a reused id resolve afresh regardless).
    pub fn clear_nexthop(&mut self, id: u32) -> Result<()> {
        if let Some(above) = self.nexthop_zero_above.as_mut()
            && id > *above
        {
            *above = id;
            return Ok(());
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, source)| {
                map_err(map_names::NEXTHOP)(aya::maps::MapError::IoError(source))
            })?
            .get() as usize;
        let zeros = PerCpuValues::try_from(vec![NextHop::default(); cpus])
            .map_err(|source| map_err(map_names::NEXTHOP)(aya::maps::MapError::IoError(source)))?;
        self.nexthop
            .set(id, zeros, 0)
            .map_err(map_err(map_names::NEXTHOP))
    }

    /// Deletes the connection entries of a removed VIP: same address, protocol and port
    /// (for an any-port VIP: same address and protocol, and its id). Returns how many went.
    pub fn flush_flows(&mut self, vip: &VipKey, vip_id: u32) -> Result<u64> {
        let doomed: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, state)| {
                let same_address =
                    key.family == vip.family && key.dst_be == vip.addr_be && key.proto == vip.proto;
                // An any-port VIP shares its address with port VIPs that stay: match its
                // entries by id so theirs survive.
                same_address
                    && if vip.port_be == 0 {
                        state.vip_id == vip_id
                    } else {
                        key.dport_be == vip.port_be
                    }
            })
            .map(|(key, _)| key)
            .collect();
        let mut removed = 0;
        for key in &doomed {
            // An entry may expire (LRU) between the walk and the delete: not an error.
            if self.conntrack.remove(key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of connection entries, both tables (walks them: one syscall per entry).
    pub fn conntrack_count(&self) -> u64 {
        self.conntrack.count()
    }

    /// Connection entries, IPv4 first, at most `limit`.
    pub fn conntrack_entries(&self, limit: usize) -> Vec<(FlowKey, FlowState)> {
        self.conntrack
            .iter()
            .filter_map(|e| e.ok())
            .take(limit)
            .collect()
    }
}

/// The two connection tables, addressed by the family-neutral [`FlowKey`]: IPv4 flows
/// live in `XLB_CONNTRACK4` under a 16-byte [`FlowKeyV4`] (the kernel hashes and compares
/// whole keys on every packet), IPv6 flows in `XLB_CONNTRACK`.
pub struct Conntrack {
    /// `XLB_CONNTRACK4`.
    pub v4: HashMap<MapData, FlowKeyV4, FlowState>,
    /// `XLB_CONNTRACK`.
    pub v6: HashMap<MapData, FlowKey, FlowState>,
}

impl Conntrack {
    /// Opens both tables pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Ok(Self {
            v4: from_pin(dir, map_names::CONNTRACK4)?,
            v6: from_pin(dir, map_names::CONNTRACK)?,
        })
    }

    /// The entry of a flow.
    pub fn get(&self, key: &FlowKey, flags: u64) -> Result<FlowState, aya::maps::MapError> {
        match key.to_v4() {
            Some(k) => self.v4.get(&k, flags),
            None => self.v6.get(key, flags),
        }
    }

    /// Writes the entry of a flow (`flags` as for `bpf_map_update_elem`).
    pub fn insert(
        &mut self,
        key: &FlowKey,
        state: &FlowState,
        flags: u64,
    ) -> Result<(), aya::maps::MapError> {
        match key.to_v4() {
            Some(k) => self.v4.insert(&k, state, flags),
            None => self.v6.insert(key, state, flags),
        }
    }

    /// Deletes the entry of a flow.
    pub fn remove(&mut self, key: &FlowKey) -> Result<(), aya::maps::MapError> {
        match key.to_v4() {
            Some(k) => self.v4.remove(&k),
            None => self.v6.remove(key),
        }
    }

    /// Every entry, IPv4 table first, IPv4 keys widened to [`FlowKey`].
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = Result<(FlowKey, FlowState), aya::maps::MapError>> + '_ {
        self.v4
            .iter()
            .map(|e| e.map(|(k, v)| (k.to_flow_key(), v)))
            .chain(self.v6.iter())
    }

    /// Number of entries in both tables (one syscall per entry).
    pub fn count(&self) -> u64 {
        (self.v4.keys().filter(|k| k.is_ok()).count()
            + self.v6.keys().filter(|k| k.is_ok()).count()) as u64
    }

    /// Moves IPv4 entries left in the IPv6 table by a datapath from before the IPv4 table
    /// (its pins adopted by this load) to the IPv4 table; returns how many.
    pub fn move_v4_from_v6_table(&mut self) -> Result<u64> {
        let v4: Vec<(FlowKey, FlowState)> = self
            .v6
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, _)| k.family == lb_common::FAMILY_V4)
            .collect();
        let mut moved = 0;
        for (key, state) in &v4 {
            let Some(k) = key.to_v4() else { continue };
            self.v4
                .insert(&k, state, 0)
                .map_err(map_err(map_names::CONNTRACK4))?;
            // Gone already (LRU) is fine: the entry is in the new table either way.
            let _ = self.v6.remove(key);
            moved += 1;
        }
        Ok(moved)
    }
}

fn sum_stats(a: &DatapathStats, b: &DatapathStats) -> DatapathStats {
    const N: usize = lb_common::DATAPATH_COUNTERS;
    let a: &[u64; N] = bytemuck::cast_ref(a);
    let b: &[u64; N] = bytemuck::cast_ref(b);
    bytemuck::cast::<[u64; N], DatapathStats>(std::array::from_fn(|i| a[i] + b[i]))
}

/// The Maglev rings, written through a shared memory mapping of the (BPF_F_MMAPABLE)
/// array: a 65,537-entry table is a memory copy, not 65,537 syscalls.
///
/// Only a window of the array is mapped at a time ([`MAGLEV_WINDOW`] bytes, moved to
/// wherever the next ring is): the kernel maps a BPF array's pages into the process when
/// it is mapped and counts them all in its resident set, so mapping the whole array of
/// 10,000 VIPs would add ~160 MB to the agent's RSS for memory that lives in the kernel
/// anyway. Rings are written in VIP-id order on a first sync, so a window serves hundreds
/// of rings before it moves.
pub struct MaglevRings {
    map: Array<MapData, u32>,
    window: std::sync::Mutex<Window>,
    /// Bytes of the array that can be mapped (whole pages).
    len: usize,
    table_size: u32,
    rings: u32,
}

/// The currently mapped part of the Maglev array.
struct Window {
    base: *mut u8,
    /// Byte offset of `base` in the array (page-aligned).
    offset: usize,
    len: usize,
}

// SAFETY: the mapping is owned by this struct; every access to it holds the window's lock.
unsafe impl Send for MaglevRings {}
unsafe impl Sync for MaglevRings {}

/// Array maps lay elements out at a stride of the value size rounded up to 8.
const MAGLEV_STRIDE: usize = 8;

/// Bytes of the Maglev array mapped at once (the most it adds to the agent's RSS).
pub const MAGLEV_WINDOW: usize = 2 << 20;

impl MaglevRings {
    fn new(map: Array<MapData, u32>, table_size: u32) -> Result<Self> {
        let entries = map.len();
        let len = (entries as usize * MAGLEV_STRIDE).next_multiple_of(page_size());
        let rings = entries.checked_div(table_size).unwrap_or(0);
        let rings = Self {
            map,
            window: std::sync::Mutex::new(Window {
                base: std::ptr::null_mut(),
                offset: 0,
                len: 0,
            }),
            len,
            table_size,
            rings,
        };
        // Map the first window now: a map that cannot be mapped fails the load, not the
        // first apply.
        {
            let mut window = rings.lock();
            rings.ensure_mapped(&mut window, 0, MAGLEV_STRIDE.min(len))?;
        }
        Ok(rings)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window holds no invariant a panic could break half-way: a poisoned lock is
        // still a valid mapping.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `[start, end)` (bytes of the array) part of the mapped window, moving it if
    /// needed; returns the address of byte `start`.
    fn ensure_mapped(&self, window: &mut Window, start: usize, end: usize) -> Result<*mut u8> {
        if window.base.is_null() || start < window.offset || end > window.offset + window.len {
            let page = page_size();
            let offset = start - start % page;
            let want = end.next_multiple_of(page) - offset;
            let len = want.max(MAGLEV_WINDOW).min(self.len - offset);
            let fd = self.map.map().fd().as_fd().as_raw_fd();
            // SAFETY: mapping part of a BPF array map fd; the kernel checks offset, size
            // and flags.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    offset as libc::off_t,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(DatapathError::Mmap {
                    name: map_names::MAGLEV,
                    source: std::io::Error::last_os_error(),
                });
            }
            window.unmap();
            *window = Window {
                base: base.cast(),
                offset,
                len,
            };
        }
        // SAFETY: start lies inside the window just checked or mapped.
        Ok(unsafe { window.base.add(start - window.offset) })
    }

    /// Table size M.
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// Number of rings.
    pub fn rings(&self) -> u32 {
        self.rings
    }

    fn check_ring(&self, ring: u32) -> Result<()> {
        if ring >= self.rings {
            return Err(DatapathError::RingOutOfRange {
                ring,
                rings: self.rings,
                size: self.table_size,
            });
        }
        Ok(())
    }

    /// Byte range of a ring in the array.
    fn ring_bytes(&self, ring: u32) -> (usize, usize) {
        let start = ring as usize * self.table_size as usize * MAGLEV_STRIDE;
        (start, start + self.table_size as usize * MAGLEV_STRIDE)
    }

    /// Writes a whole ring. The ring must not be live (see `VipInfo::ring`).
    pub fn write_ring(&mut self, ring: u32, table: &[u32]) -> Result<()> {
        self.check_ring(ring)?;
        if table.len() != self.table_size as usize {
            return Err(DatapathError::TableSize {
                got: table.len(),
                want: self.table_size,
            });
        }
        let (start, end) = self.ring_bytes(ring);
        let mut window = self.lock();
        let base = self.ensure_mapped(&mut window, start, end)?;
        for (i, id) in table.iter().enumerate() {
            // SAFETY: i < M: the slot lies in [start, end), which is mapped.
            unsafe {
                let slot = base.add(i * MAGLEV_STRIDE).cast::<u32>();
                std::ptr::write_volatile(slot, *id);
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Reads a whole ring.
    pub fn read_ring(&self, ring: u32) -> Result<Vec<u32>> {
        self.check_ring(ring)?;
        let (start, end) = self.ring_bytes(ring);
        let mut window = self.lock();
        let base = self.ensure_mapped(&mut window, start, end)?;
        Ok((0..self.table_size as usize)
            // SAFETY: i < M: the slot lies in [start, end), which is mapped.
            .map(|i| unsafe { std::ptr::read_volatile(base.add(i * MAGLEV_STRIDE).cast::<u32>()) })
            .collect())
    }

    /// One slot of a ring.
    pub fn slot(&self, ring: u32, slot: u32) -> Result<u32> {
        self.check_ring(ring)?;
        let index = ring * self.table_size + slot % self.table_size.max(1);
        self.map.get(&index, 0).map_err(map_err(map_names::MAGLEV))
    }

    /// Bytes of the array mapped into this process right now (at most [`MAGLEV_WINDOW`],
    /// or one ring if a ring is larger).
    pub fn mapped_bytes(&self) -> usize {
        self.lock().len
    }
}

impl Window {
    fn unmap(&mut self) {
        if !self.base.is_null() {
            // SAFETY: unmapping exactly what `ensure_mapped` mapped.
            unsafe {
                libc::munmap(self.base.cast(), self.len);
            }
            self.base = std::ptr::null_mut();
            self.len = 0;
        }
    }
}

impl Drop for MaglevRings {
    fn drop(&mut self) {
        self.lock().unmap();
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

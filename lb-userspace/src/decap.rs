//! `xlb decap`: the backend side of encapsulated forwarding.
//!
//! Attaches `xlb_decap` to one interface of a backend and fills `XLB_DECAP_ADDRS` with the
//! tunnel endpoint addresses it should accept (by default every address of the interface).
//! The datapath is pinned under its own directory (default [`DEFAULT_DECAP_PIN_DIR`]), apart
//! from a balancer on the same host. The process runs until SIGTERM/SIGINT; then it
//! detaches and removes its pins, unless asked to keep them (`--keep`), in which case the
//! program keeps decapsulating and `xlb unload --pin-dir DIR` removes it later.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use lb_common::{VipAddrKey, limits::MAX_DECAP_ADDRS, map_names, program_names};

use crate::datapath::{self, AttachMode, Attached, Datapath, DatapathError, LoadOptions};
use crate::model;

/// Default pin directory of the decapsulator.
pub const DEFAULT_DECAP_PIN_DIR: &str = "/sys/fs/bpf/xlb-decap";

/// Errors of the decapsulator.
#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    /// Loading, attaching or a map write failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The interface's addresses could not be listed.
    #[error("listing the addresses of {iface}: {source}")]
    Addresses {
        /// The interface.
        iface: String,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing to decapsulate for.
    #[error("{iface} has no IP address; pass --address")]
    NoAddresses {
        /// The interface.
        iface: String,
    },
    /// More addresses than the map holds.
    #[error("{count} addresses given but the decapsulator holds at most {max}")]
    TooManyAddresses {
        /// Given.
        count: usize,
        /// Limit.
        max: u32,
    },
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DecapOptions {
    /// Interface to attach to.
    pub iface: String,
    /// Tunnel endpoint addresses; empty = the interface's own addresses.
    pub addresses: Vec<IpAddr>,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// Attach mode.
    pub mode: AttachMode,
}

/// A running decapsulator.
pub struct Decap {
    datapath: Datapath,
    iface: String,
    /// The addresses it accepts.
    pub addresses: Vec<IpAddr>,
    /// How the program was attached.
    pub attached: Attached,
}

/// Map sizes for the decapsulator: it uses only `XLB_DECAP_ADDRS` and `XLB_DECAP_STATS`, so
/// the balancer's maps (loaded with the same object) are made as small as the kernel allows.
pub fn load_options(pin_dir: &Path) -> LoadOptions {
    LoadOptions {
        pin_dir: pin_dir.to_path_buf(),
        maglev_table_size: 7,
        max_vips: 1,
        max_backends: 2,
        conntrack_entries: 1,
    }
}

/// The addresses configured on `iface` (IPv4 and IPv6, link-local IPv6 excluded: tunnels
/// are addressed to routable addresses).
pub fn interface_addresses(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` walks the list getifaddrs returned; each node is valid until
        // freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        if name.to_bytes() != iface.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
        let family = unsafe { (*entry.ifa_addr).sa_family } as i32;
        match family {
            libc::AF_INET => {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                let addr = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if !addr.is_unicast_link_local() {
                    out.push(IpAddr::V6(addr));
                }
            }
            _ => {}
        }
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn addr_key(address: IpAddr) -> VipAddrKey {
    let (addr_be, family) = model::address_words(address);
    VipAddrKey {
        addr_be,
        family,
        _pad: [0; 3],
    }
}

impl Decap {
    /// Loads (adopting pins), attaches (adopting a pinned link) and sets the addresses.
    pub fn start(opts: &DecapOptions) -> Result<Decap, DecapError> {
        let mut addresses = if opts.addresses.is_empty() {
            interface_addresses(&opts.iface).map_err(|source| DecapError::Addresses {
                iface: opts.iface.clone(),
                source,
            })?
        } else {
            opts.addresses.clone()
        };
        addresses.sort();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(DecapError::NoAddresses {
                iface: opts.iface.clone(),
            });
        }
        if addresses.len() > MAX_DECAP_ADDRS as usize {
            return Err(DecapError::TooManyAddresses {
                count: addresses.len(),
                max: MAX_DECAP_ADDRS,
            });
        }
        let mut datapath = Datapath::load(&load_options(&opts.pin_dir))?;
        // Addresses before the program: a packet must never meet an empty set while the
        // operator expects decapsulation.
        let wanted: Vec<VipAddrKey> = addresses.iter().map(|a| addr_key(*a)).collect();
        let stale: Vec<VipAddrKey> = datapath
            .maps
            .decap_addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in &wanted {
            datapath
                .maps
                .decap_addrs
                .insert(key, &1, 0)
                .map_err(|source| DatapathError::Map {
                    name: map_names::DECAP_ADDRS,
                    source,
                })?;
        }
        for key in &stale {
            let _ = datapath.maps.decap_addrs.remove(key);
        }
        let attached = datapath.attach_pinned(program_names::DECAP, &opts.iface, opts.mode)?;
        Ok(Decap {
            datapath,
            iface: opts.iface.clone(),
            addresses,
            attached,
        })
    }

    /// The maps (for counters).
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Stops: with `keep`, leaves the program attached and the pins in place; otherwise
    /// detaches and removes every pin of the decapsulator's directory.
    pub fn stop(self, keep: bool) -> Result<(), DecapError> {
        let pin_dir = self.datapath.pin_dir().to_path_buf();
        drop(self.datapath);
        if keep {
            return Ok(());
        }
        datapath::detach_pinned(&pin_dir, program_names::DECAP, &self.iface)?;
        datapath::unload(&pin_dir)?;
        Ok(())
    }
}

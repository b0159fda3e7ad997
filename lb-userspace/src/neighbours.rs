//! Keeps the next hops toward backends resolved.
//!
//! The balancer's `bpf_fib_lookup` reads the neighbour table but never triggers resolution:
//! a backend (or the router in front of it) that nothing else talks to has no neighbour
//! entry, and its packets would take the gateway-MAC fallback or be dropped
//! (`drop_fib_failure`). For every backend the agent has not handled yet, it asks the kernel
//! for the route (`ip route get`; all new backends in one `ip -batch`) and creates a
//! *managed* neighbour entry for each distinct next hop (`ip neigh replace … managed`, Linux
//! 5.16+), which the kernel resolves and keeps fresh on its own.
//!
//! This runs on a [`Resolver`] thread, not on the apply path: a first sync of 100,000
//! backends spends about two seconds in `ip`, which would otherwise delay the next change by
//! as much. Resolution is asynchronous anyway (the kernel sends the ARP/ND probe after the
//! entry exists), so the datapath never relied on it having finished when maps are written.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

/// Parses `ip route get` output: `ADDR [via GW] dev DEV …`; local routes have no next hop.
fn parse_route_get(text: &str, addr: IpAddr) -> Option<(IpAddr, String)> {
    let line = text.lines().next()?;
    if line.starts_with("local ") {
        return None;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
    };
    let dev = after("dev")?.to_string();
    let next_hop = match after("via") {
        // IPv6 routes via an IPv4 gateway print "via inet 192.0.2.1".
        Some(&"inet") | Some(&"inet6") => after("inet").or(after("inet6"))?.parse().ok()?,
        Some(gw) => gw.parse().ok()?,
        None => addr,
    };
    Some((next_hop, dev))
}

/// Runs `ip -force -batch -` with `commands` on stdin; its stdout (failed commands only
/// leave a line on stderr, the others still run).
fn ip_batch(commands: &str) -> std::io::Result<std::process::Output> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Written from a thread: a large batch fills the stdout pipe while stdin is written.
    let input = commands.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out)
}

/// Backends looked up per `ip -batch` run: bounds the memory a first sync of 100,000
/// backends spends on `ip`'s answers (~100 bytes each) to about a megabyte at a time.
const ADDRESSES_PER_BATCH: usize = 10_000;

/// Keeps next hops resolved on a thread of its own; it remembers which backends it handled.
pub struct Resolver {
    to_thread: Option<std::sync::mpsc::Sender<Vec<IpAddr>>>,
    /// Used when the thread could not be started: resolution runs on the caller.
    inline_done: BTreeSet<IpAddr>,
}

impl Resolver {
    /// Starts the thread (named `xlb-neighbours`). It stops once the resolver is dropped and
    /// the work already handed over is done.
    pub fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<IpAddr>>();
        let spawned = std::thread::Builder::new()
            .name("xlb-neighbours".into())
            .spawn(move || {
                let mut done = BTreeSet::new();
                while let Ok(mut addresses) = rx.recv() {
                    // Whatever queued up meanwhile goes in the same runs of `ip`.
                    while let Ok(more) = rx.try_recv() {
                        addresses.extend(more);
                    }
                    keep_resolved_in_batches(&addresses, &mut done);
                }
            });
        let to_thread = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the neighbour thread: resolving inline");
                None
            }
        };
        Resolver {
            to_thread,
            inline_done: BTreeSet::new(),
        }
    }

    /// Has the next hops of `backends` resolved (those not handled before), without waiting.
    pub fn submit(&mut self, backends: Vec<IpAddr>) {
        if backends.is_empty() {
            return;
        }
        let Some(tx) = &self.to_thread else {
            return keep_resolved_in_batches(&backends, &mut self.inline_done);
        };
        // The thread is gone (it panicked) when the send fails: carry on here.
        if let Err(std::sync::mpsc::SendError(returned)) = tx.send(backends) {
            self.to_thread = None;
            keep_resolved_in_batches(&returned, &mut self.inline_done);
        }
    }
}

/// [`keep_resolved`] over `addresses`, [`ADDRESSES_PER_BATCH`] at a time.
fn keep_resolved_in_batches(addresses: &[IpAddr], done: &mut BTreeSet<IpAddr>) {
    for chunk in addresses.chunks(ADDRESSES_PER_BATCH) {
        keep_resolved(chunk.iter().copied(), done);
    }
}

/// Creates managed neighbour entries for the next hops of `backends` not seen before;
/// remembers them in `done`. Failures are logged, never fatal: the datapath still has the
/// gateway fallback, and the stack resolves neighbours for its own traffic.
///
/// Two `ip` processes however many backends are new (one batch of route lookups, one of
/// neighbour entries per distinct next hop): a first sync of 100,000 backends behind one
/// router costs one neighbour entry, not 200,000 processes.
pub fn keep_resolved(backends: impl IntoIterator<Item = IpAddr>, done: &mut BTreeSet<IpAddr>) {
    let new: Vec<IpAddr> = backends.into_iter().filter(|a| done.insert(*a)).collect();
    if new.is_empty() {
        return;
    }
    let lookups: String = new.iter().map(|a| format!("route get {a}\n")).collect();
    let out = match ip_batch(&lookups) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, "cannot run `ip`");
            return;
        }
    };
    // Each answer starts with an unindented line naming the address (after `local` etc.).
    let text = String::from_utf8_lossy(&out.stdout);
    let mut answered: BTreeSet<IpAddr> = BTreeSet::new();
    let mut next_hops: BTreeSet<(IpAddr, String)> = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with(char::is_whitespace)) {
        let Some(addr) = line
            .split_whitespace()
            .take(2)
            .find_map(|w| w.parse::<IpAddr>().ok())
        else {
            continue;
        };
        answered.insert(addr);
        if let Some(hop) = parse_route_get(line, addr) {
            next_hops.insert(hop);
        }
    }
    let unrouted: Vec<&IpAddr> = new.iter().filter(|a| !answered.contains(a)).collect();
    if let Some(first) = unrouted.first() {
        tracing::warn!(backend = %first, backends = unrouted.len(),
            "no route to the backend(s): their packets will use the gateway fallback or be dropped");
    }
    if next_hops.is_empty() {
        return;
    }
    let entries: String = next_hops
        .iter()
        .map(|(hop, dev)| format!("neigh replace {hop} dev {dev} managed\n"))
        .collect();
    match ip_batch(&entries) {
        Ok(out) if out.status.success() => {
            tracing::debug!(
                next_hops = next_hops.len(),
                backends = new.len(),
                "managed neighbour entries"
            );
        }
        Ok(out) => tracing::warn!(
            next_hops = next_hops.len(),
            error = %String::from_utf8_lossy(&out.stderr).trim(),
            "cannot create a managed neighbour entry (needs Linux 5.16+)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot run `ip`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_direct_routed_and_local_answers() {
        let a: IpAddr = "198.51.100.6".parse().unwrap();
        assert_eq!(
            parse_route_get(
                "198.51.100.6 dev b1 src 198.51.100.5 uid 0 \n    cache \n",
                a
            ),
            Some((a, "b1".into()))
        );
        assert_eq!(
            parse_route_get(
                "198.51.100.11 via 192.0.2.254 dev lb0 src 192.0.2.1 uid 0 \n",
                a
            ),
            Some(("192.0.2.254".parse().unwrap(), "lb0".into()))
        );
        let b: IpAddr = "2001:db8:b::21".parse().unwrap();
        assert_eq!(
            parse_route_get(
                "2001:db8:b::21 from :: via 2001:db8:1::fe dev lb0 proto kernel src 2001:db8:1::1 metric 1024 pref medium\n",
                b
            ),
            Some(("2001:db8:1::fe".parse().unwrap(), "lb0".into()))
        );
        assert_eq!(
            parse_route_get(
                "local 192.0.2.1 dev lo table local src 192.0.2.1 uid 0\n",
                a
            ),
            None
        );
        assert_eq!(parse_route_get("", a), None);
    }
}

//! Keeps the next hops toward backends resolved.
//!
//! The balancer's `bpf_fib_lookup` reads the neighbour table but never triggers resolution:
//! a backend (or the router in front of it) that nothing else talks to has no neighbour
//! entry, and its packets would take the gateway-MAC fallback or be dropped
//! (`drop_fib_failure`). For every backend the agent has not handled yet, it asks the kernel
//! for the route (`ip route get`) and creates a *managed* neighbour entry for the next hop
//! (`ip neigh replace … managed`, Linux 5.16+), which the kernel resolves and keeps fresh on
//! its own.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

/// The next hop and egress device the kernel would use for `addr`.
fn route_to(addr: IpAddr) -> Option<(IpAddr, String)> {
    let out = Command::new("ip")
        .args(["route", "get", &addr.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_route_get(&String::from_utf8_lossy(&out.stdout), addr)
}

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

/// Creates managed neighbour entries for the next hops of `backends` not seen before;
/// remembers them in `done`. Failures are logged, never fatal: the datapath still has the
/// gateway fallback, and the stack resolves neighbours for its own traffic.
pub fn keep_resolved(backends: impl IntoIterator<Item = IpAddr>, done: &mut BTreeSet<IpAddr>) {
    for addr in backends {
        if !done.insert(addr) {
            continue;
        }
        let Some((next_hop, dev)) = route_to(addr) else {
            tracing::warn!(backend = %addr, "no route to the backend: its packets will use the gateway fallback or be dropped");
            continue;
        };
        let result = Command::new("ip")
            .args([
                "neigh",
                "replace",
                &next_hop.to_string(),
                "dev",
                &dev,
                "managed",
            ])
            .output();
        match result {
            Ok(out) if out.status.success() => {
                tracing::debug!(backend = %addr, %next_hop, dev, "managed neighbour entry");
            }
            Ok(out) => tracing::warn!(
                backend = %addr,
                %next_hop,
                dev,
                error = %String::from_utf8_lossy(&out.stderr).trim(),
                "cannot create a managed neighbour entry (needs Linux 5.16+)"
            ),
            Err(e) => tracing::warn!(backend = %addr, error = %e, "cannot run `ip`"),
        }
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

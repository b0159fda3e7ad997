//! Host and path matching with Ingress (`networking.k8s.io/v1`) semantics.
//!
//! Host: an exact host beats a wildcard (`*.example.com` matches exactly one extra label),
//! which beats host-less rules. The most specific host group that exists is the only one
//! searched (as in other Ingress controllers, a host-specific rule set does not fall through
//! to host-less rules); when it has no matching path the default backend is used, else 404.
//! Path: `Exact` beats `Prefix`; among prefixes the longest wins; prefixes match whole
//! `/`-separated elements (`/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`);
//! `ImplementationSpecific` is treated as `Prefix`.

use std::borrow::Cow;
use std::collections::HashMap;

use super::config::PathType;

/// Routes of one host (or of the host-less rules).
#[derive(Debug)]
struct HostRoutes<R> {
    exact: HashMap<Box<str>, R>,
    /// Normalised prefixes (no trailing `/`; `/` becomes ``), longest first.
    prefixes: Vec<(Box<str>, R)>,
}

impl<R> Default for HostRoutes<R> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            prefixes: Vec::new(),
        }
    }
}

impl<R> HostRoutes<R> {
    fn lookup(&self, path: &str) -> Option<&R> {
        if let Some(r) = self.exact.get(path) {
            return Some(r);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| prefix_matches(p, path))
            .map(|(_, r)| r)
    }
}

/// `prefix` is normalised (no trailing slash). Element-wise: the request path must continue
/// with `/` or end right after the prefix.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

/// A compiled route table; `R` is what a match yields.
#[derive(Debug)]
pub struct RouteTable<R> {
    exact_hosts: HashMap<Box<str>, HostRoutes<R>>,
    /// Keyed by the wildcard's suffix without `*.` (`example.com` for `*.example.com`).
    wildcard_hosts: HashMap<Box<str>, HostRoutes<R>>,
    any_host: Option<HostRoutes<R>>,
    default_backend: Option<R>,
}

impl<R> Default for RouteTable<R> {
    fn default() -> Self {
        Self {
            exact_hosts: HashMap::new(),
            wildcard_hosts: HashMap::new(),
            any_host: None,
            default_backend: None,
        }
    }
}

impl<R> RouteTable<R> {
    /// Adds one path of a rule. The first definition of a (host, path, type) wins, so that
    /// config order decides conflicts between Ingresses deterministically.
    pub fn add(&mut self, host: Option<&str>, path: &str, path_type: PathType, route: R) {
        let group = match host {
            None => self.any_host.get_or_insert_with(HostRoutes::default),
            Some(h) => match h.strip_prefix("*.") {
                Some(suffix) => self.wildcard_hosts.entry(suffix.into()).or_default(),
                None => self.exact_hosts.entry(h.into()).or_default(),
            },
        };
        match path_type {
            PathType::Exact => {
                group.exact.entry(path.into()).or_insert(route);
            }
            PathType::Prefix | PathType::ImplementationSpecific => {
                let norm = path.trim_end_matches('/');
                if group.prefixes.iter().all(|(p, _)| &**p != norm) {
                    group.prefixes.push((norm.into(), route));
                    // Stable sort keeps config order among equal lengths (they are distinct).
                    group.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
                }
            }
        }
    }

    /// Sets the default backend (requests that match no rule).
    pub fn set_default(&mut self, route: R) {
        self.default_backend = Some(route);
    }

    /// Finds the route for a request. `host` may carry a port and any case; `path` is the
    /// request path without the query.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&R> {
        // Without host-specific rules there is no host to look at.
        let host = host.filter(|_| !self.exact_hosts.is_empty() || !self.wildcard_hosts.is_empty());
        let group = host.map(normalise_host).and_then(|h| {
            self.exact_hosts.get(&*h).or_else(|| {
                // One label only: the wildcard suffix is everything after the first dot.
                let (label, suffix) = h.split_once('.')?;
                if label.is_empty() {
                    return None;
                }
                self.wildcard_hosts.get(suffix)
            })
        });
        match group.or(self.any_host.as_ref()) {
            Some(g) => g.lookup(path).or(self.default_backend.as_ref()),
            None => self.default_backend.as_ref(),
        }
    }
}

/// Lowercases and strips a port (and the brackets of an IPv6 literal), allocating only when
/// the host has upper-case letters.
pub fn normalise_host(host: &str) -> Cow<'_, str> {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathType::*;

    fn table() -> RouteTable<&'static str> {
        let mut t = RouteTable::default();
        t.add(Some("app.example.com"), "/", Prefix, "app-root");
        t.add(Some("app.example.com"), "/api", Prefix, "app-api");
        t.add(Some("app.example.com"), "/api/v2/", Prefix, "app-api-v2");
        t.add(Some("app.example.com"), "/api", Exact, "app-api-exact");
        t.add(
            Some("app.example.com"),
            "/legacy",
            ImplementationSpecific,
            "app-legacy",
        );
        t.add(Some("*.example.com"), "/", Prefix, "wild");
        t.add(None, "/any", Prefix, "any");
        t
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let t = table();
        let h = Some("app.example.com");
        assert_eq!(t.lookup(h, "/api"), Some(&"app-api-exact"));
        assert_eq!(t.lookup(h, "/api/"), Some(&"app-api"));
        assert_eq!(t.lookup(h, "/api/v1"), Some(&"app-api"));
        assert_eq!(t.lookup(h, "/api/v2"), Some(&"app-api-v2"));
        assert_eq!(t.lookup(h, "/api/v2/x"), Some(&"app-api-v2"));
        assert_eq!(t.lookup(h, "/apix"), Some(&"app-root"));
        assert_eq!(t.lookup(h, "/legacy/x"), Some(&"app-legacy"));
        assert_eq!(t.lookup(h, "/"), Some(&"app-root"));
    }

    #[test]
    fn prefix_is_element_wise() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("", "/anything"));
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let t = table();
        assert_eq!(t.lookup(Some("x.example.com"), "/"), Some(&"wild"));
        assert_eq!(t.lookup(Some("X.Example.COM:8080"), "/"), Some(&"wild"));
        assert_eq!(t.lookup(Some("a.b.example.com"), "/any"), Some(&"any"));
        assert_eq!(t.lookup(Some("example.com"), "/any"), Some(&"any"));
        assert_eq!(t.lookup(Some(".example.com"), "/any"), Some(&"any"));
    }

    #[test]
    fn host_groups_do_not_fall_through_and_default_applies() {
        let mut t = table();
        assert_eq!(t.lookup(Some("x.example.com"), "/any"), Some(&"wild"));
        assert_eq!(t.lookup(Some("other.org"), "/nope"), None);
        assert_eq!(t.lookup(None, "/any/1"), Some(&"any"));
        t.set_default("default");
        assert_eq!(t.lookup(Some("other.org"), "/nope"), Some(&"default"));
    }

    #[test]
    fn first_definition_wins() {
        let mut t = RouteTable::default();
        t.add(Some("a.io"), "/x/", Prefix, 1);
        t.add(Some("a.io"), "/x", Prefix, 2);
        t.add(Some("a.io"), "/e", Exact, 3);
        t.add(Some("a.io"), "/e", Exact, 4);
        assert_eq!(t.lookup(Some("a.io"), "/x"), Some(&1));
        assert_eq!(t.lookup(Some("a.io"), "/e"), Some(&3));
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalise_host("A.io:80"), "a.io");
        assert_eq!(normalise_host("a.io."), "a.io");
        assert_eq!(normalise_host("[::1]:80"), "::1");
        assert!(matches!(normalise_host("a.io"), Cow::Borrowed(_)));
    }
}

//! Request path normalisation, done before routing.
//!
//! Without it `/public/../admin` or `/public/%2e%2e/admin` would match a `/public` rule and
//! reach that rule's backend, which resolves the dots itself and serves `/admin`: routing rules
//! could be walked around. Routing therefore sees the path in the normal form of RFC 3986
//! §6.2.2, as nginx's location matching does, and the upstream is sent that same form (as
//! Envoy's `normalize_path` does), so the proxy and the backend agree on what was asked for:
//!
//! 1. Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; the hex
//!    digits of the other escapes are upper-cased. An encoded slash (`%2F`) stays encoded: it
//!    is data inside a segment, not a separator.
//! 2. Runs of `/` are merged into one (nginx's `merge_slashes`; configurable).
//! 3. `.` and `..` segments are removed (RFC 3986 §5.2.4).
//!
//! A malformed escape, an encoded NUL, or a `..` that would climb above the root is refused
//! (the caller answers 400, as nginx does). Paths that need none of this, nearly all of
//! them, are recognised by one scan and borrowed unchanged.

use std::borrow::Cow;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding")]
    BadEscape,
    /// `%00`: no backend should be handed a NUL.
    #[error("percent-encoded NUL")]
    EncodedNul,
    /// `..` with no segment left to remove.
    #[error("'..' climbs above the root")]
    AboveRoot,
}

/// The normal form of `path` (a request path without its query). Paths that do not start
/// with `/` (`*` of `OPTIONS *`) are returned unchanged.
pub fn normalise(path: &str, merge_slashes: bool) -> Result<Cow<'_, str>, BadPath> {
    if !path.starts_with('/') || is_normal(path.as_bytes(), merge_slashes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let mut kept: Vec<&str> = Vec::new();
    // Whether the result ends with '/': after an empty, `.` or `..` last segment.
    let mut trailing_slash = false;
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        trailing_slash = i == last;
        match *segment {
            "." => {}
            ".." => {
                if kept.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
            }
            "" if merge_slashes || i == last => {}
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// True when `path` has no escape, no `.`/`..` segment and (when merging) no `//`: nothing
/// to do. One pass over the bytes, no allocation.
fn is_normal(path: &[u8], merge_slashes: bool) -> bool {
    let mut after_slash = false;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' => return false,
            b'/' if after_slash && merge_slashes => return false,
            b'.' if after_slash && is_dot_segment(&path[i..]) => return false,
            _ => {}
        }
        after_slash = b == b'/';
    }
    true
}

/// `rest` starts with a `.`: is that segment `.` or `..`?
fn is_dot_segment(rest: &[u8]) -> bool {
    matches!(
        rest,
        [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
    )
}

/// Decodes escapes of unreserved characters and upper-cases the hex of the others.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let bytes = path.as_bytes();
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // The run up to the next escape, as one slice: '%' is ASCII, so it ends on a
            // char boundary.
            let end = bytes[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).and_then(|c| hex(*c)),
            bytes.get(i + 2).and_then(|c| hex(*c)),
        ) else {
            return Err(BadPath::BadEscape);
        };
        let c = hi << 4 | lo;
        if c == 0 {
            return Err(BadPath::EncodedNul);
        }
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(c));
        } else {
            out.push('%');
            out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
            out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

fn hex(c: u8) -> Option<u8> {
    char::from(c).to_digit(16).map(|d| d as u8)
}

/// Why a rule's path can never match a normalised request path, if it cannot: it holds a
/// `.` or `..` segment, a `//` while slashes are merged (the Kubernetes API refuses both in
/// Exact and Prefix paths) or a malformed escape. Escapes that normalisation only rewrites
/// are fine: rules are added in normal form.
pub fn rule_path_problem(path: &str, merge_slashes: bool) -> Option<String> {
    let b = path.as_bytes();
    let dot_segment = b
        .windows(2)
        .enumerate()
        .any(|(i, w)| w[0] == b'/' && w[1] == b'.' && is_dot_segment(&b[i + 1..]));
    if dot_segment || (merge_slashes && path.contains("//")) {
        let hint = normalise(path, merge_slashes)
            .map(|n| format!("; did you mean {n:?}?"))
            .unwrap_or_default();
        return Some(format!(
            "{path:?} has an empty, '.' or '..' segment, which requests never match after normalisation{hint}"
        ));
    }
    normalise(path, merge_slashes)
        .err()
        .map(|e| format!("{path:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, BadPath> {
        normalise(p, true).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d/.e/f.", "/~user/x-y_z", "*"] {
            assert!(
                matches!(normalise(p, true), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        let cases = [
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/public/../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a/b/../../c/", "/c/"),
            ("/a/./../b/./c/.", "/b/c/"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn slashes_merge_unless_disabled() {
        assert_eq!(norm("//a///b//").as_deref(), Ok("/a/b/"));
        assert_eq!(norm("//").as_deref(), Ok("/"));
        let keep = |p| normalise(p, false).map(Cow::into_owned);
        assert_eq!(keep("//a///b//").as_deref(), Ok("//a///b//"));
        assert_eq!(keep("/a//../b").as_deref(), Ok("/a/b"));
        assert_eq!(keep("/a//./b").as_deref(), Ok("/a//b"));
    }

    #[test]
    fn escapes_of_unreserved_characters_are_decoded_before_dots() {
        assert_eq!(norm("/public/%2e%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(norm("/public/%2E./admin").as_deref(), Ok("/admin"));
        assert_eq!(norm("/%61pi/%7Euser").as_deref(), Ok("/api/~user"));
        // Reserved and non-ASCII escapes stay encoded, hex upper-cased.
        assert_eq!(norm("/a%2fb/%3f").as_deref(), Ok("/a%2Fb/%3F"));
        assert_eq!(norm("/a%2F..%2Fb").as_deref(), Ok("/a%2F..%2Fb"));
        assert_eq!(norm("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/é/%41").as_deref(), Ok("/é/A"));
    }

    #[test]
    fn malformed_paths_are_refused() {
        assert_eq!(norm("/.."), Err(BadPath::AboveRoot));
        assert_eq!(norm("/a/../.."), Err(BadPath::AboveRoot));
        assert_eq!(norm("/%2e%2e/etc/passwd"), Err(BadPath::AboveRoot));
        assert_eq!(norm("/a%"), Err(BadPath::BadEscape));
        assert_eq!(norm("/a%4"), Err(BadPath::BadEscape));
        assert_eq!(norm("/a%zz"), Err(BadPath::BadEscape));
        assert_eq!(norm("/a%00b"), Err(BadPath::EncodedNul));
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        let inputs = [
            "/a/./b//c/../d%2e/%2E%2e/x%2f",
            "//x/%7e/../y/.",
            "/a%c3%a9/b/",
        ];
        for p in inputs {
            let once = norm(p).unwrap();
            assert_eq!(norm(&once).as_deref(), Ok(once.as_str()), "{p}");
        }
    }

    #[test]
    fn rule_paths_with_dot_or_empty_segments_are_named() {
        assert_eq!(rule_path_problem("/api/v1", true), None);
        assert_eq!(rule_path_problem("/caf%c3%a9", true), None);
        assert_eq!(rule_path_problem("/a.b/..c", true), None);
        let p = rule_path_problem("/api/../v1", true).unwrap();
        assert!(p.contains("did you mean \"/v1\""), "{p}");
        assert!(rule_path_problem("/api//v1", true).is_some());
        assert_eq!(rule_path_problem("/api//v1", false), None);
        assert!(rule_path_problem("/api/.", false).is_some());
        assert!(
            rule_path_problem("/a%zz", true)
                .unwrap()
                .contains("percent")
        );
    }
}

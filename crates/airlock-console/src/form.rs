//! `application/x-www-form-urlencoded` bodies and query strings, in and out: the console's
//! forms post plain HTML forms, and its links carry filters in query strings.

/// The pairs of a form body or query string, in order, decoded. Malformed escapes are kept as
/// text rather than refused: every value is validated by the API it is sent to.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

/// The first value of `name`, if any.
pub fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The first non-empty value of `name`, trimmed.
pub fn filled<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    first(pairs, name).map(str::trim).filter(|v| !v.is_empty())
}

/// Every value of `name`.
pub fn all<'a>(pairs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    pairs.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let pair = bytes.get(i + 1).and_then(|h| hex(*h)).zip(bytes.get(i + 2).and_then(|l| hex(*l)));
                if let Some((h, l)) = pair {
                    out.push(h << 4 | l);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a query-string component (everything but unreserved characters).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string from the pairs whose value is not empty (`?a=1&b=2`, or nothing).
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.filter(|v| !v.is_empty()).map(|v| format!("{name}={}", encode(v))))
        .collect();
    if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
}

/// Whether `next` is a path on this site (not `//host`, not a scheme), safe to redirect to.
pub fn local_path(next: &str) -> bool {
    next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') && !next.contains(['\r', '\n'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_decodes() {
        let pairs = parse("a=1+2&b=%3Cscript%3E&c&d=%zz&ids=x&ids=y");
        assert_eq!(first(&pairs, "a"), Some("1 2"));
        assert_eq!(first(&pairs, "b"), Some("<script>"));
        assert_eq!(first(&pairs, "c"), Some(""));
        assert_eq!(first(&pairs, "d"), Some("%zz"));
        assert_eq!(all(&pairs, "ids"), vec!["x", "y"]);
        assert_eq!(filled(&pairs, "c"), None);
        let text = "infra.* & <x> \"y\" é";
        assert_eq!(parse(&format!("v={}", encode(text))), vec![("v".into(), text.into())]);
        assert_eq!(query(&[("a", Some("1")), ("b", None), ("c", Some(""))]), "?a=1");
        assert_eq!(query(&[("b", None)]), "");
    }

    #[test]
    fn only_local_paths_are_redirect_targets() {
        assert!(local_path("/inbox?topic=x"));
        for bad in ["//evil.example", "https://evil.example", "javascript:alert(1)", "/\\evil", "/a\r\nb", ""]
        {
            assert!(!local_path(bad), "{bad}");
        }
    }
}

//! Payload paths: dotted keys, `[n]` for one list element and `[*]` for any element, as in
//! `rules[*].cidr`. A path with `[*]` holds when any element it reaches satisfies the test.

use std::fmt;

use serde_json::Value;

use crate::limits::{PATH_FANOUT_MAX, PATH_SEGMENTS_MAX};

/// A parsed payload path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Path {
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Segment {
    Key(String),
    Index(usize),
    Any,
}

/// Why a path was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Nothing to resolve.
    #[error("empty path")]
    Empty,
    /// `a..b`, a leading or trailing dot.
    #[error("`{0}` has an empty segment")]
    EmptySegment(String),
    /// `[` without `]`, or something other than a number or `*` inside.
    #[error("`{0}` has a bad index; use `[*]` or `[0]`, `[1]`, ...")]
    BadIndex(String),
    /// Past [`PATH_SEGMENTS_MAX`].
    #[error("`{0}` has more than {PATH_SEGMENTS_MAX} segments")]
    TooLong(String),
}

/// The path reached more values than [`PATH_FANOUT_MAX`] in one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("path expansion visited more than {PATH_FANOUT_MAX} payload values")]
pub struct FanoutExceeded;

impl Path {
    /// Parses `a.b[*].c`.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (key, mut indexes) = match part.find('[') {
                Some(i) => part.split_at(i),
                None => (part, ""),
            };
            if key.is_empty() && (indexes.is_empty() || segments.is_empty()) {
                return Err(PathError::EmptySegment(text.to_owned()));
            }
            if !key.is_empty() {
                if key.contains(']') {
                    return Err(PathError::BadIndex(text.to_owned()));
                }
                segments.push(Segment::Key(key.to_owned()));
            }
            while !indexes.is_empty() {
                let inner_end = indexes.find(']').ok_or_else(|| PathError::BadIndex(text.to_owned()))?;
                let (inner, rest) = indexes.split_at(inner_end);
                let inner = inner.strip_prefix('[').ok_or_else(|| PathError::BadIndex(text.to_owned()))?;
                segments.push(match inner {
                    "*" => Segment::Any,
                    n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                        Segment::Index(n.parse().map_err(|_| PathError::BadIndex(text.to_owned()))?)
                    }
                    _ => return Err(PathError::BadIndex(text.to_owned())),
                });
                indexes = rest.strip_prefix(']').unwrap_or(rest);
            }
        }
        if segments.len() > PATH_SEGMENTS_MAX {
            return Err(PathError::TooLong(text.to_owned()));
        }
        Ok(Self { segments })
    }

    /// Calls `test` on every value the path reaches from `root` until one passes. `Ok(true)`
    /// when one passed; an error when the expansion exceeds [`PATH_FANOUT_MAX`] values.
    pub fn any(&self, root: &Value, test: &mut impl FnMut(&Value) -> bool) -> Result<bool, FanoutExceeded> {
        let mut budget = PATH_FANOUT_MAX;
        visit(&self.segments, root, &mut budget, test)
    }
}

fn visit(
    segments: &[Segment],
    value: &Value,
    budget: &mut usize,
    test: &mut impl FnMut(&Value) -> bool,
) -> Result<bool, FanoutExceeded> {
    *budget = budget.checked_sub(1).ok_or(FanoutExceeded)?;
    let Some((first, rest)) = segments.split_first() else {
        return Ok(test(value));
    };
    match (first, value) {
        (Segment::Key(k), Value::Object(map)) => match map.get(k) {
            Some(v) => visit(rest, v, budget, test),
            None => Ok(false),
        },
        (Segment::Index(i), Value::Array(items)) => match items.get(*i) {
            Some(v) => visit(rest, v, budget, test),
            None => Ok(false),
        },
        (Segment::Any, Value::Array(items)) => {
            for item in items {
                if visit(rest, item, budget, test)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
                Segment::Any => write!(f, "[*]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn found(path: &str, root: &Value, wanted: &Value) -> bool {
        Path::parse(path).unwrap().any(root, &mut |v| v == wanted).unwrap()
    }

    #[test]
    fn resolves_keys_indexes_and_wildcards() {
        let root = json!({"rules": [{"cidr": "10.0.0.0/8"}, {"cidr": "0.0.0.0/0"}], "a": {"b": 1}});
        assert!(found("rules[*].cidr", &root, &json!("0.0.0.0/0")));
        assert!(found("rules[1].cidr", &root, &json!("0.0.0.0/0")));
        assert!(!found("rules[0].cidr", &root, &json!("0.0.0.0/0")));
        assert!(!found("rules[5].cidr", &root, &json!("0.0.0.0/0")));
        assert!(found("a.b", &root, &json!(1)));
        assert!(!found("a.b.c", &root, &json!(1)));
        let nested = json!({"m": [[1, 2], [3]]});
        assert!(found("m[*][*]", &nested, &json!(3)));
    }

    #[test]
    fn round_trips_to_text() {
        for text in ["a", "a.b", "rules[*].cidr", "m[0][*].x"] {
            assert_eq!(Path::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn refuses_bad_paths() {
        assert_eq!(Path::parse(""), Err(PathError::Empty));
        assert!(matches!(Path::parse("a..b"), Err(PathError::EmptySegment(_))));
        assert!(matches!(Path::parse(".a"), Err(PathError::EmptySegment(_))));
        assert!(matches!(Path::parse("a[x]"), Err(PathError::BadIndex(_))));
        assert!(matches!(Path::parse("a[1"), Err(PathError::BadIndex(_))));
        assert!(matches!(Path::parse("a]"), Err(PathError::BadIndex(_))));
        let long = vec!["k"; PATH_SEGMENTS_MAX + 1].join(".");
        assert!(matches!(Path::parse(&long), Err(PathError::TooLong(_))));
    }

    #[test]
    fn expansion_is_bounded() {
        let root = json!({"items": vec![json!({"x": 0}); PATH_FANOUT_MAX + 1]});
        let path = Path::parse("items[*].x").unwrap();
        assert_eq!(path.any(&root, &mut |v| v == &json!(1)), Err(FanoutExceeded));
    }
}

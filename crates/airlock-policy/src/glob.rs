//! Globs over dotted names: `*` matches within one segment (no `.`), `**` across any number of
//! segments. `infra.*` matches `infra.vm` but not `infra.vm.delete`; `infra.**` matches both.

use std::fmt;

use crate::limits::{GLOB_BYTES_MAX, GLOB_WILDCARDS_MAX};

/// A compiled glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    source: String,
    shape: Shape,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// No wildcard at all.
    Exact,
    /// `prefix**`: anything that starts with the prefix.
    PrefixAny(String),
    /// `prefix*`: the prefix, then anything without a dot.
    PrefixSegment(String),
    /// Anything else, matched token by token.
    Tokens(Vec<Token>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(String),
    Star,
    DoubleStar,
}

/// Why a glob was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// The pattern is empty.
    #[error("empty glob")]
    Empty,
    /// Longer than [`GLOB_BYTES_MAX`] or with more than [`GLOB_WILDCARDS_MAX`] wildcards.
    #[error("a glob may have at most {GLOB_BYTES_MAX} bytes and {GLOB_WILDCARDS_MAX} wildcards")]
    TooLong,
    /// Three or more stars in a row.
    #[error("`{0}` has three or more `*` in a row; use `*` for one segment or `**` for any")]
    TooManyStars(String),
    /// A character other globs give meaning to, which would silently match itself here.
    #[error("`{pattern}` uses `{ch}`, which Airlock globs do not support; only `*` and `**` are wildcards")]
    Unsupported {
        /// The pattern.
        pattern: String,
        /// The character.
        ch: char,
    },
}

impl Glob {
    /// Compiles a pattern.
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.contains("***") {
            return Err(GlobError::TooManyStars(pattern.to_owned()));
        }
        if let Some(ch) = pattern.chars().find(|c| matches!(c, '?' | '[' | ']' | '{' | '}')) {
            return Err(GlobError::Unsupported { pattern: pattern.to_owned(), ch });
        }
        let mut tokens = Vec::new();
        let mut rest = pattern;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("**") {
                tokens.push(Token::DoubleStar);
                rest = after;
            } else if let Some(after) = rest.strip_prefix('*') {
                tokens.push(Token::Star);
                rest = after;
            } else {
                let end = rest.find('*').unwrap_or(rest.len());
                let (literal, after) = rest.split_at(end);
                tokens.push(Token::Literal(literal.to_owned()));
                rest = after;
            }
        }
        if pattern.len() > GLOB_BYTES_MAX
            || tokens.iter().filter(|t| !matches!(t, Token::Literal(_))).count() > GLOB_WILDCARDS_MAX
        {
            return Err(GlobError::TooLong);
        }
        let shape = match tokens.as_slice() {
            [Token::Literal(_)] => Shape::Exact,
            [Token::DoubleStar] => Shape::PrefixAny(String::new()),
            [Token::Star] => Shape::PrefixSegment(String::new()),
            [Token::Literal(p), Token::DoubleStar] => Shape::PrefixAny(p.clone()),
            [Token::Literal(p), Token::Star] => Shape::PrefixSegment(p.clone()),
            _ => Shape::Tokens(tokens),
        };
        Ok(Self { source: pattern.to_owned(), shape })
    }

    /// True when the pattern has no wildcard, so it only matches itself.
    pub fn is_literal(&self) -> bool {
        self.shape == Shape::Exact
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        match &self.shape {
            Shape::Exact => self.source == name,
            Shape::PrefixAny(prefix) => name.starts_with(prefix.as_str()),
            Shape::PrefixSegment(prefix) => {
                name.strip_prefix(prefix.as_str()).is_some_and(|rest| !rest.contains('.'))
            }
            Shape::Tokens(tokens) => {
                let mut failed = vec![false; (tokens.len() + 1) * (name.len() + 1)];
                match_tokens(tokens, name, 0, 0, &mut failed)
            }
        }
    }
}

/// Matches `tokens[t..]` against `name[pos..]`, remembering failed states so that any pattern
/// costs at most tokens × length steps.
fn match_tokens(tokens: &[Token], name: &str, t: usize, pos: usize, failed: &mut [bool]) -> bool {
    let slot = t * (name.len() + 1) + pos;
    if failed.get(slot).copied().unwrap_or(false) {
        return false;
    }
    let rest = name.get(pos..).unwrap_or("");
    let matched = match tokens.get(t) {
        None => rest.is_empty(),
        Some(Token::Literal(lit)) => {
            rest.starts_with(lit.as_str()) && match_tokens(tokens, name, t + 1, pos + lit.len(), failed)
        }
        Some(star) => {
            let crosses_dots = *star == Token::DoubleStar;
            let mut end = pos;
            loop {
                if match_tokens(tokens, name, t + 1, end, failed) {
                    break true;
                }
                match name.get(end..).and_then(|s| s.chars().next()) {
                    Some(c) if crosses_dots || c != '.' => end += c.len_utf8(),
                    _ => break false,
                }
            }
        }
    };
    if !matched && let Some(f) = failed.get_mut(slot) {
        *f = true;
    }
    matched
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, name: &str, expected: bool) {
        let glob = Glob::new(pattern).unwrap();
        assert_eq!(glob.matches(name), expected, "`{pattern}` vs `{name}`");
    }

    #[test]
    fn single_star_stays_in_its_segment() {
        check("infra.*", "infra.vm", true);
        check("infra.*", "infra.vm.delete", false);
        check("infra.*", "infra", false);
        check("infra.*.read", "infra.bucket.read", true);
        check("infra.*.read", "infra.bucket.acl.read", false);
        check("*", "anything", true);
        check("*", "a.b", false);
        check("prod-*", "prod-eu", true);
    }

    #[test]
    fn double_star_crosses_segments() {
        check("infra.**", "infra.vm.delete", true);
        check("infra.**", "infrastructure", false);
        check("**.delete", "infra.vm.delete", true);
        check("infra.**.delete", "infra.a.b.delete", true);
        check("infra.**.delete", "infra.a.b.update", false);
        check("**", "", true);
    }

    #[test]
    fn literals_match_only_themselves() {
        check("infra.vm.delete", "infra.vm.delete", true);
        check("infra.vm.delete", "infra.vm.deletes", false);
        assert!(Glob::new("a.b").unwrap().is_literal());
    }

    #[test]
    fn pathological_patterns_stay_cheap() {
        let name = "a".repeat(2000);
        check("*a*a*a*a*a*a*a*a*a*b", &name, false);
        check("**a**a**a**a**a**b", &name, false);
    }

    #[test]
    fn refuses_bad_patterns() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert!(matches!(Glob::new("a.***"), Err(GlobError::TooManyStars(_))));
        assert!(matches!(Glob::new("a.?"), Err(GlobError::Unsupported { ch: '?', .. })));
        assert!(matches!(Glob::new("a.[bc]"), Err(GlobError::Unsupported { ch: '[', .. })));
        assert_eq!(Glob::new(&"*a".repeat(GLOB_WILDCARDS_MAX + 1)), Err(GlobError::TooLong));
        assert!(Glob::new(&"*a".repeat(GLOB_WILDCARDS_MAX)).is_ok());
    }
}

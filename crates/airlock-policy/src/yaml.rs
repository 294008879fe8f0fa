//! A YAML reader that keeps the line and column of every node, so that every policy error can
//! point at its place. Anchors, aliases and tags are refused: a policy must read the same to a
//! reviewer and to Airlock, and aliases are the classic way to make a small file expand hugely.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diag::{Diagnostic, Span};
use crate::limits::YAML_DEPTH_MAX;

/// A YAML node with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub span: Span,
    /// What it holds.
    pub kind: Kind,
}

/// The value of a node, scalars resolved by the YAML 1.2 core schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// `null`, `~` or nothing.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A plain integer.
    Int(i64),
    /// A plain float.
    Float(f64),
    /// Any quoted scalar, and every plain scalar that is not one of the above.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order, keys unique.
    Map(Vec<(Key, Node)>),
}

/// A mapping key: always a scalar, kept as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// Where the key starts.
    pub span: Span,
    /// The key's text.
    pub text: String,
}

impl Kind {
    /// The name of the kind, as used in "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Int(_) => "an integer",
            Self::Float(_) => "a number",
            Self::Str(_) => "a string",
            Self::Seq(_) => "a list",
            Self::Map(_) => "a map",
        }
    }
}

impl Node {
    /// Converts to JSON. YAML floats that JSON cannot hold (`.nan`, `.inf`) become null.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Int(i) => Value::from(*i),
            Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Map(entries) => {
                Value::Object(entries.iter().map(|(k, v)| (k.text.clone(), v.to_json())).collect())
            }
        }
    }
}

/// Parses one YAML document. An empty document is an empty map at line 1.
pub fn parse(text: &str) -> Result<Node, Vec<Diagnostic>> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Events are pulled one at a time rather than through `Parser::load`, which recurses once
    // per block level: a deeply nested document then stops at the depth limit instead of
    // overflowing the stack.
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd | Event::DocumentEnd, _)) => break,
            Ok((event, mark)) => builder.on_event(event, mark),
            Err(e) => {
                let span = span_of(*e.marker());
                builder.errors.push(Diagnostic::error(span, format!("invalid YAML: {}", e.info())));
                break;
            }
        }
        if builder.skipped_depth > 0 {
            break;
        }
    }
    if !builder.errors.is_empty() {
        return Err(builder.errors);
    }
    Ok(builder.root.unwrap_or(Node { span: Span { line: 1, col: 1 }, kind: Kind::Map(Vec::new()) }))
}

fn span_of(mark: Marker) -> Span {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Span { line: clamp(mark.line()), col: clamp(mark.col().saturating_add(1)) }
}

enum Frame {
    Seq { span: Span, items: Vec<Node> },
    Map { span: Span, entries: Vec<(Key, Node)>, key: Option<Key> },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    errors: Vec<Diagnostic>,
    /// Nesting past the depth limit is counted but not built.
    skipped_depth: usize,
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                Some(k) => entries.push((k, node)),
                None => match node.kind {
                    Kind::Str(text) => self.accept_key(Key { span: node.span, text }),
                    Kind::Seq(_) | Kind::Map(_) => self
                        .errors
                        .push(Diagnostic::error(node.span, "a map key must be a scalar, found a collection")),
                    _ => {
                        let text = match node.kind {
                            Kind::Null => "null".to_owned(),
                            Kind::Bool(b) => b.to_string(),
                            Kind::Int(i) => i.to_string(),
                            Kind::Float(f) => f.to_string(),
                            _ => String::new(),
                        };
                        self.accept_key(Key { span: node.span, text });
                    }
                },
            },
        }
    }

    fn accept_key(&mut self, key: Key) {
        if let Some(Frame::Map { entries, key: slot, .. }) = self.stack.last_mut() {
            if entries.iter().any(|(k, _)| k.text == key.text) {
                self.errors.push(
                    Diagnostic::error(key.span, format!("duplicate key `{}`", key.text))
                        .with_help("each key may appear once in a map"),
                );
            }
            *slot = Some(key);
        }
    }

    fn open(&mut self, frame: Frame, span: Span) -> bool {
        if self.skipped_depth > 0 || self.stack.len() >= YAML_DEPTH_MAX {
            if self.skipped_depth == 0 {
                self.errors
                    .push(Diagnostic::error(span, format!("nesting deeper than {YAML_DEPTH_MAX} levels")));
            }
            self.skipped_depth += 1;
            return false;
        }
        self.stack.push(frame);
        true
    }

    fn close(&mut self) {
        if self.skipped_depth > 0 {
            self.skipped_depth -= 1;
            return;
        }
        let node = match self.stack.pop() {
            Some(Frame::Seq { span, items }) => Node { span, kind: Kind::Seq(items) },
            // The parser marks a block map where its first key ends; its first key is
            // where a reader sees it start.
            Some(Frame::Map { span, entries, .. }) => {
                let span = entries.first().map_or(span, |(key, _)| key.span);
                Node { span, kind: Kind::Map(entries) }
            }
            None => return,
        };
        self.push_node(node);
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let span = span_of(mark);
        // Refused constructs are reported, then read as if they were absent, so that one
        // mistake does not cascade into errors about the structure around it.
        match &event {
            Event::Scalar(_, _, anchor, tag)
            | Event::SequenceStart(anchor, tag)
            | Event::MappingStart(anchor, tag) => {
                if *anchor != 0 {
                    self.errors.push(
                        Diagnostic::error(span, "YAML anchors are not supported")
                            .with_help("remove the `&name`; write the value out in full"),
                    );
                }
                if let Some(tag) = tag {
                    self.errors.push(Diagnostic::error(
                        span,
                        format!("YAML tags are not supported, found `{}{}`", tag.handle, tag.suffix),
                    ));
                }
            }
            Event::Alias(_) => self.errors.push(
                Diagnostic::error(span, "YAML aliases are not supported")
                    .with_help("write the value out in full"),
            ),
            _ => {}
        }
        match event {
            Event::Alias(_) if self.skipped_depth == 0 => self.push_node(Node { span, kind: Kind::Null }),
            Event::Scalar(text, style, _, _) if self.skipped_depth == 0 => {
                let kind = resolve(text, style);
                self.push_node(Node { span, kind });
            }
            Event::SequenceStart(..) => {
                self.open(Frame::Seq { span, items: Vec::new() }, span);
            }
            Event::MappingStart(..) => {
                self.open(Frame::Map { span, entries: Vec::new(), key: None }, span);
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            _ => {}
        }
    }
}

/// Resolves a scalar by the YAML 1.2 core schema; quoted scalars are always strings.
fn resolve(text: String, style: TScalarStyle) -> Kind {
    if style != TScalarStyle::Plain {
        return Kind::Str(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Kind::Null,
        "true" | "True" | "TRUE" => return Kind::Bool(true),
        "false" | "False" | "FALSE" => return Kind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Kind::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Kind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Kind::Float(f64::NAN),
        _ => {}
    }
    if let Some(int) = parse_int(&text) {
        return Kind::Int(int);
    }
    if looks_like_float(&text)
        && let Ok(f) = text.parse::<f64>()
    {
        return Kind::Float(f);
    }
    Kind::Str(text)
}

fn parse_int(text: &str) -> Option<i64> {
    // `from_str_radix` accepts a sign, which YAML's `0x`/`0o` forms do not.
    if let Some(hex) = text.strip_prefix("0x") {
        return hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| i64::from_str_radix(hex, 16).ok())
            .flatten();
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return oct
            .bytes()
            .all(|b| (b'0'..=b'7').contains(&b))
            .then(|| i64::from_str_radix(oct, 8).ok())
            .flatten();
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The core schema's float pattern: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
fn looks_like_float(text: &str) -> bool {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = all_digits(int)
        && frac.is_none_or(all_digits)
        && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()));
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> Kind {
        parse(text).unwrap().kind
    }

    #[test]
    fn resolves_scalars_by_the_core_schema() {
        assert_eq!(kind("1"), Kind::Int(1));
        assert_eq!(kind("-0x10"), Kind::Str("-0x10".into()));
        assert_eq!(kind("0x-1"), Kind::Str("0x-1".into()));
        assert_eq!(kind("0x1f"), Kind::Int(31));
        assert_eq!(kind("1.5"), Kind::Float(1.5));
        assert_eq!(kind("1e3"), Kind::Float(1000.0));
        assert_eq!(kind("'1'"), Kind::Str("1".into()));
        assert_eq!(kind("yes"), Kind::Str("yes".into()));
        assert_eq!(kind("0.0.0.0/0"), Kind::Str("0.0.0.0/0".into()));
        assert_eq!(kind("~"), Kind::Null);
        assert_eq!(kind("True"), Kind::Bool(true));
    }

    #[test]
    fn keeps_positions() {
        let node = parse("a:\n  b: [1, 2]\n").unwrap();
        let Kind::Map(entries) = node.kind else { panic!("map expected") };
        let (key, value) = &entries[0];
        assert_eq!(key.span, Span { line: 1, col: 1 });
        let Kind::Map(inner) = &value.kind else { panic!("map expected") };
        assert_eq!(inner[0].0.span, Span { line: 2, col: 3 });
        assert_eq!(inner[0].1.span, Span { line: 2, col: 6 });
    }

    #[test]
    fn refuses_duplicates_aliases_tags_and_depth() {
        let errors = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(errors[0].message, "duplicate key `a`");
        assert_eq!(errors[0].span, Span { line: 2, col: 1 });
        assert!(parse("a: &x 1\nb: *x\n").is_err());
        assert!(parse("a: !!str 1\n").is_err());
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let errors = parse(&deep).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("nesting deeper"));
        let deep_block = "- ".repeat(100_000);
        assert!(parse(&deep_block).unwrap_err()[0].message.contains("nesting deeper"));
    }

    #[test]
    fn reports_syntax_errors_with_position() {
        let errors = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(errors[0].message.starts_with("invalid YAML"), "{:?}", errors);
    }

    #[test]
    fn empty_document_is_an_empty_map() {
        assert_eq!(kind(""), Kind::Map(Vec::new()));
    }
}

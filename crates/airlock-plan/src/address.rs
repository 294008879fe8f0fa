//! Terraform resource addresses (`module.x["key"].aws_security_group.y[0]`): split into the
//! module path, mode, type, name and instance key, with `for_each` keys that hold quotes, dots
//! and brackets read as the strings they are.

use std::fmt;

use serde_json::Value;

/// Whether a resource is managed or read (`data.`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A `resource` block.
    Managed,
    /// A `data` block.
    Data,
}

impl Mode {
    /// The name Terraform uses in plan JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Managed => "managed",
            Self::Data => "data",
        }
    }
}

/// An instance key: `[0]` or `["key"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// A `count` index.
    Index(u64),
    /// A `for_each` key.
    Name(String),
}

impl Key {
    /// The key as plan JSON gives it in `index`.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Index(i) => Value::from(*i),
            Self::Name(s) => Value::String(s.clone()),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Index(i) => write!(f, "[{i}]"),
            Self::Name(s) => {
                f.write_str("[\"")?;
                for c in s.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        '\t' => f.write_str("\\t")?,
                        '\r' => f.write_str("\\r")?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("\"]")
            }
        }
    }
}

/// A parsed resource instance address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The module path, e.g. `module.net["eu"].module.sg`; empty in the root module.
    pub module: String,
    /// Managed or data.
    pub mode: Mode,
    /// The resource type, e.g. `aws_security_group`.
    pub resource_type: String,
    /// The resource name.
    pub name: String,
    /// The instance key, when the resource has `count` or `for_each`.
    pub key: Option<Key>,
}

/// Why an address did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{address}` is not a resource address: {why}")]
pub struct AddressError {
    /// The address as given.
    pub address: String,
    /// What is wrong, in words.
    pub why: String,
}

/// One `name` or `name[key]` step of an address, with where it starts.
struct Step {
    start: usize,
    name: String,
    key: Option<Key>,
}

impl Address {
    /// Parses an address; every bracket and quote must be balanced and every step named.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let fail = |why: String| AddressError { address: text.to_owned(), why };
        let steps = steps(text).map_err(fail)?;
        // Module steps come in pairs (`module`, NAME[KEY]), so the step count tells a data
        // resource (three steps: `data`, TYPE, NAME) from a managed one (TYPE, NAME), even
        // when a module or a resource is itself called `data` or `module`.
        let resource_steps = if steps.len() % 2 == 1 { 3 } else { 2 };
        let Some(split) = steps.len().checked_sub(resource_steps) else {
            return Err(fail("expected `[module.NAME.]...[data.]TYPE.NAME[KEY]`".into()));
        };
        let (modules, resource) = steps.split_at(split);
        for pair in modules.chunks(2) {
            if let [word, _] = pair
                && (word.name != "module" || word.key.is_some())
            {
                return Err(fail(format!("expected `module` before a module name, found `{}`", word.name)));
            }
        }
        let module = match resource.first() {
            Some(step) if split > 0 => {
                text.get(..step.start.saturating_sub(1)).unwrap_or_default().to_owned()
            }
            _ => String::new(),
        };
        let (mode, ty, name) = match resource {
            [data, ty, name] if data.name == "data" && data.key.is_none() => (Mode::Data, ty, name),
            [ty, name] => (Mode::Managed, ty, name),
            _ => return Err(fail("expected `[module.NAME.]...[data.]TYPE.NAME[KEY]`".into())),
        };
        if ty.key.is_some() {
            return Err(fail(format!("the resource type `{}` cannot have a key", ty.name)));
        }
        if ty.name == "module" {
            return Err(fail("a module path must end in a resource".into()));
        }
        Ok(Self {
            module,
            mode,
            resource_type: ty.name.clone(),
            name: name.name.clone(),
            key: name.key.clone(),
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.module.is_empty() {
            write!(f, "{}.", self.module)?;
        }
        if self.mode == Mode::Data {
            f.write_str("data.")?;
        }
        write!(f, "{}.{}", self.resource_type, self.name)?;
        if let Some(key) = &self.key {
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

/// Splits an address into its dotted steps; dots inside a quoted key do not split.
fn steps(text: &str) -> Result<Vec<Step>, String> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    loop {
        let start = chars.get(i).map_or(text.len(), |(at, _)| *at);
        let mut name = String::new();
        while let Some((_, c)) =
            chars.get(i).filter(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            name.push(*c);
            i += 1;
        }
        if name.is_empty() {
            return Err(match chars.get(i) {
                Some((at, c)) => format!("unexpected `{c}` at byte {at}"),
                None if steps.is_empty() => "it is empty".to_owned(),
                None => "it ends with `.`".to_owned(),
            });
        }
        let key = match chars.get(i) {
            Some((_, '[')) => {
                let (key, next) = key(&chars, i + 1)?;
                i = next;
                Some(key)
            }
            _ => None,
        };
        steps.push(Step { start, name, key });
        match chars.get(i) {
            None => return Ok(steps),
            Some((_, '.')) => i += 1,
            Some((at, c)) => return Err(format!("unexpected `{c}` at byte {at}")),
        }
    }
}

/// Reads a key after `[` up to and including `]`; the position after it.
fn key(chars: &[(usize, char)], mut i: usize) -> Result<(Key, usize), String> {
    match chars.get(i) {
        Some((_, '"')) => {
            i += 1;
            let mut out = String::new();
            loop {
                match chars.get(i) {
                    None => return Err("a quoted key is not closed".into()),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => {
                        let escaped = match chars.get(i + 1) {
                            Some((_, 'n')) => '\n',
                            Some((_, 't')) => '\t',
                            Some((_, 'r')) => '\r',
                            Some((_, c @ ('"' | '\\'))) => *c,
                            Some((at, c)) => return Err(format!("unknown escape `\\{c}` at byte {at}")),
                            None => return Err("a quoted key is not closed".into()),
                        };
                        out.push(escaped);
                        i += 2;
                    }
                    Some((_, c)) => {
                        out.push(*c);
                        i += 1;
                    }
                }
            }
            match chars.get(i + 1) {
                Some((_, ']')) => Ok((Key::Name(out), i + 2)),
                _ => Err("a key must end with `]`".into()),
            }
        }
        _ => {
            let mut digits = String::new();
            while let Some((_, c)) = chars.get(i).filter(|(_, c)| c.is_ascii_digit()) {
                digits.push(*c);
                i += 1;
            }
            match (chars.get(i), digits.parse::<u64>()) {
                (Some((_, ']')), Ok(n)) => Ok((Key::Index(n), i + 1)),
                _ => Err("a key must be a number or a quoted string in `[...]`".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    fn parse(text: &str) -> Address {
        Address::parse(text).unwrap()
    }

    #[test]
    fn root_module_and_data_resources() {
        let a = parse("aws_security_group.web");
        assert_eq!(
            (a.module.as_str(), a.mode, a.resource_type.as_str(), a.name.as_str()),
            ("", Mode::Managed, "aws_security_group", "web")
        );
        assert_eq!(a.key, None);
        let d = parse("data.aws_iam_policy_document.p[2]");
        assert_eq!(
            (d.mode, d.resource_type.as_str(), d.key),
            (Mode::Data, "aws_iam_policy_document", Some(Key::Index(2)))
        );
    }

    #[test]
    fn modules_with_for_each_keys_holding_dots_quotes_and_brackets() {
        let text = r#"module.x["a.b[\"c\"]"].module.y[3].aws_security_group.y["k.e]y"]"#;
        let a = parse(text);
        assert_eq!(a.module, r#"module.x["a.b[\"c\"]"].module.y[3]"#);
        assert_eq!(a.resource_type, "aws_security_group");
        assert_eq!(a.name, "y");
        assert_eq!(a.key, Some(Key::Name("k.e]y".into())));
        assert_eq!(a.to_string(), text);
        let m = parse("module.data.data.aws_ami.ubuntu");
        assert_eq!(
            (m.module.as_str(), m.mode, m.resource_type.as_str()),
            ("module.data", Mode::Data, "aws_ami")
        );
        let named_module = parse("module.module.module.data.aws_instance.data");
        assert_eq!(named_module.module, "module.module.module.data");
        assert_eq!((named_module.mode, named_module.name.as_str()), (Mode::Managed, "data"));
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for (text, why) in [
            ("", "empty"),
            ("aws_instance", "expected"),
            ("aws_instance.", "ends with"),
            ("aws_instance.a[\"x]", "not closed"),
            ("aws_instance.a[x]", "number or a quoted"),
            ("aws_instance[0].a", "cannot have a key"),
            ("module.m", "must end in a resource"),
            ("modul.m.aws_instance.a", "expected `module`"),
            ("module.m.module.n", "must end in a resource"),
            ("a.b c", "unexpected ` `"),
        ] {
            let e = Address::parse(text).unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }
}

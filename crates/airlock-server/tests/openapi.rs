//! The served OpenAPI document against the router: every route in `ROUTES` is documented, no
//! documented operation is stale, and the router source registers nothing `ROUTES` lacks, so a
//! route added without documentation fails here.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::collections::BTreeSet;

use serde_json::Value;

/// The router source, read as text to find every `.route(...)` call.
const ROUTER_SOURCE: &str = include_str!("../src/lib.rs");

/// The HTTP methods OpenAPI names as path item keys, which are also axum's method functions.
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Routes that need no API key.
const PUBLIC: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"];

fn document() -> Value {
    serde_json::from_str(airlock_server::OPENAPI).unwrap_or_else(|e| panic!("openapi.json is not JSON: {e}"))
}

fn routes() -> BTreeSet<(String, String)> {
    let routes: BTreeSet<_> =
        airlock_server::ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(routes.len(), airlock_server::ROUTES.len(), "ROUTES lists a route twice");
    routes
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for key in item.as_object().unwrap().keys() {
            if METHODS.contains(&key.as_str()) {
                out.insert((key.clone(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_document_is_openapi_3_1() {
    let doc = document();
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1."), "openapi is `{version}`, expected 3.1.x");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert_eq!(doc["components"]["securitySchemes"]["bearerKey"]["scheme"], "bearer");
    for name in ["Job", "JobSummary", "Decision", "Approval", "Snapshot", "Key", "AuditRecord", "Error"] {
        assert!(doc["components"]["schemas"][name].is_object(), "components/schemas/{name} is missing");
    }
}

#[test]
fn every_route_is_documented() {
    let documented = documented(&document());
    for (method, path) in routes() {
        assert!(
            documented.contains(&(method.clone(), path.clone())),
            "route `{} {path}` is in ROUTES but not in openapi.json",
            method.to_uppercase()
        );
    }
}

#[test]
fn every_documented_operation_is_a_route() {
    let routes = routes();
    for (method, path) in documented(&document()) {
        assert!(
            routes.contains(&(method.clone(), path.clone())),
            "openapi.json documents `{} {path}`, which is not in ROUTES",
            method.to_uppercase()
        );
    }
}

#[test]
fn the_router_registers_only_routes_in_routes() {
    let registered = registered_routes(ROUTER_SOURCE);
    assert!(!registered.is_empty(), "found no `.route(` call in lib.rs");
    let routes = routes();
    for (method, path) in &registered {
        assert!(
            routes.contains(&(method.clone(), path.clone())),
            "lib.rs registers `{} {path}`, which is not in ROUTES (and so not checked against openapi.json)",
            method.to_uppercase()
        );
    }
    for (method, path) in &routes {
        assert!(
            registered.contains(&(method.clone(), path.clone())),
            "ROUTES lists `{} {path}`, which lib.rs does not register",
            method.to_uppercase()
        );
    }
}

#[test]
fn operations_are_described_and_secured() {
    let doc = document();
    for (method, path) in documented(&doc) {
        let op = &doc["paths"][&path][&method];
        let name = format!("{} {path}", method.to_uppercase());
        assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()), "{name}: no summary");
        let description = op["description"].as_str().unwrap_or_default();
        let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{name}: no responses"));
        if PUBLIC.contains(&path.as_str()) {
            assert_eq!(
                op["security"],
                serde_json::json!([]),
                "{name}: a public route must set `security: []`"
            );
        } else {
            let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
            let own_scheme = op["security"].as_array().is_some_and(|s| {
                !s.is_empty()
                    && s.iter().all(|r| r.as_object().unwrap().keys().all(|k| schemes.contains_key(k)))
            });
            assert!(
                op.get("security").is_none() || own_scheme,
                "{name}: must use the global bearer-key security or name a declared scheme"
            );
            assert!(description.contains("**Role:**"), "{name}: the description must name the required role");
            assert!(responses.contains_key("401"), "{name}: no 401 response");
        }
        for (status, response) in responses {
            let reference = response["$ref"].as_str();
            assert!(
                reference.is_some() || response["description"].is_string(),
                "{name}: response {status} has no description"
            );
        }
        for param in path.split('{').skip(1).filter_map(|p| p.split('}').next()) {
            let declared = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "path" && p["name"] == param));
            assert!(declared, "{name}: path parameter `{param}` is not declared");
        }
    }
}

#[test]
fn every_reference_resolves() {
    let doc = document();
    let mut references = Vec::new();
    collect_references(&doc, &mut references);
    assert!(!references.is_empty());
    for reference in references {
        let pointer =
            reference.strip_prefix('#').unwrap_or_else(|| panic!("`{reference}` is not a local reference"));
        assert!(doc.pointer(pointer).is_some(), "`{reference}` does not resolve");
    }
}

fn collect_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_references(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
        _ => {}
    }
}

#[test]
fn route_extraction_reads_chains_and_ignores_comments() {
    let source = r#"
        Router::new()
            // .route("/commented", get(h))
            .route("/a", axum::routing::get(x::get))
            .route("/b/{id}", post(x::post).get(y::list).delete(z::gone))
            .route(
                "/c",
                put(handler),
            )
            .fallback(|| async { "http://not-a-comment" })
    "#;
    let found: Vec<_> = registered_routes(source).into_iter().collect();
    let expected: Vec<(String, String)> =
        [("delete", "/b/{id}"), ("get", "/a"), ("get", "/b/{id}"), ("post", "/b/{id}"), ("put", "/c")]
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
    assert_eq!(found, expected);
}

/// Every (method, path) the source registers with `.route("PATH", METHOD(..).METHOD(..)..)`.
/// Anything the scan does not understand fails the test rather than being skipped.
fn registered_routes(source: &str) -> BTreeSet<(String, String)> {
    let code = strip_comments(source);
    for unsupported in [".route_service(", ".nest(", ".nest_service(", ".merge("] {
        assert!(
            !code.contains(unsupported),
            "the router uses `{unsupported}`, which this test cannot read; extend `registered_routes`"
        );
    }
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let args = balanced(rest);
        let (path, method_router) = split_route_args(args);
        for method in depth_zero_calls(method_router) {
            assert!(
                METHODS.contains(&method.as_str()),
                "`.route(\"{path}\", ...)` uses `{method}(`, which this test cannot read; \
                 extend `registered_routes`"
            );
            out.insert((method, path.clone()));
        }
    }
    out
}

/// The source without `//` comments (string literals kept intact).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '/' && chars.peek() == Some(&'/') {
            for skipped in chars.by_ref() {
                if skipped == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// The text up to the parenthesis that closes the one just opened.
fn balanced(text: &str) -> &str {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match (in_string, c) {
            (true, _) if escaped => escaped = false,
            (true, '\\') => escaped = true,
            (true, '"') => in_string = false,
            (true, _) => {}
            (false, '"') => in_string = true,
            (false, '(' | '[' | '{') => depth += 1,
            (false, ')') if depth == 0 => return &text[..i],
            (false, ')' | ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    panic!("unbalanced `.route(` call in lib.rs")
}

/// `"PATH", method_router` → the path and the method router expression.
fn split_route_args(args: &str) -> (String, &str) {
    let trimmed = args.trim_start();
    let literal = trimmed.strip_prefix('"').unwrap_or_else(|| {
        panic!("`.route({})` does not start with a string literal path", trimmed.lines().next().unwrap_or(""))
    });
    let end = literal.find('"').unwrap();
    let path = literal[..end].to_owned();
    let after = literal[end + 1..].trim_start();
    let method_router =
        after.strip_prefix(',').unwrap_or_else(|| panic!("`.route(\"{path}\"` has no method router"));
    (path, method_router)
}

/// The names of the calls at the top level of an expression: `post(a).get(b::c)` → post, get.
fn depth_zero_calls(expression: &str) -> Vec<String> {
    let mut calls = Vec::new();
    let mut depth = 0usize;
    let mut ident = String::new();
    let mut in_string = false;
    for c in expression.chars() {
        if in_string {
            in_string = c != '"';
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' => {
                if depth == 0 && !ident.is_empty() {
                    let name = std::mem::take(&mut ident);
                    calls.push(name.rsplit("::").next().unwrap_or_default().to_owned());
                }
                depth += 1;
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            c if depth == 0 && (c.is_ascii_alphanumeric() || c == '_') => ident.push(c),
            ':' if depth == 0 => ident.push(c),
            _ if depth == 0 => ident.clear(),
            _ => {}
        }
    }
    calls
}

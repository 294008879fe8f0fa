//! An upstream reached over MCP's streamable HTTP transport (`--upstream-url`): each message is
//! a POST; its answer is one JSON message or a server-sent event stream of them (the response
//! with the server's notifications and requests before it). The session id the server gives at
//! `initialize` goes on every later request, and a GET stream carries what the server sends
//! outside any request, when it offers one.

use std::io::{BufRead, BufReader};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// How long a connection attempt may take (a call itself may take as long as the tool does).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct HttpUpstream {
    url: String,
    agent: ureq::Agent,
    session: Mutex<Option<String>>,
    version: Mutex<Option<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HttpUpstream {
    pub(crate) fn new(url: &str) -> Result<Self, String> {
        let url = url.trim().to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("the upstream URL `{url}` must start with `http://` or `https://`"));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(format!("airlock-mcp/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self { url, agent, session: Mutex::new(None), version: Mutex::new(None) })
    }

    /// The protocol version negotiated at `initialize`, sent on every later request.
    pub(crate) fn set_version(&self, version: &str) {
        *lock(&self.version) = Some(version.to_owned());
    }

    /// Posts one message; each message of the answer goes to `deliver`. An error when the
    /// upstream cannot be reached or refuses the message.
    pub(crate) fn post(&self, line: &str, deliver: &mut dyn FnMut(String)) -> Result<(), String> {
        let mut request = self
            .agent
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json");
        if let Some(session) = lock(&self.session).clone() {
            request = request.header("mcp-session-id", session);
        }
        if let Some(version) = lock(&self.version).clone() {
            request = request.header("mcp-protocol-version", version);
        }
        let response = request.send(line).map_err(|e| format!("cannot reach {}: {e}", self.url))?;
        if let Some(session) = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            *lock(&self.session) = Some(session.to_owned());
        }
        let status = response.status().as_u16();
        if status == 202 {
            return Ok(());
        }
        if !(200..300).contains(&status) {
            return Err(format!("{} answered HTTP {status}", self.url));
        }
        read_messages(response, deliver)
    }

    /// Reads the server's own stream (GET), if it offers one, until it ends.
    pub(crate) fn listen(&self, deliver: &mut dyn FnMut(String)) {
        let Some(session) = lock(&self.session).clone() else { return };
        let mut request =
            self.agent.get(&self.url).header("accept", "text/event-stream").header("mcp-session-id", session);
        if let Some(version) = lock(&self.version).clone() {
            request = request.header("mcp-protocol-version", version);
        }
        match request.call() {
            Ok(response) if response.status().is_success() => {
                if let Err(e) = read_messages(response, deliver) {
                    tracing::warn!(error = %e, "the upstream's event stream ended");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot open the upstream's event stream"),
        }
    }

    /// Ends the session (DELETE), as the transport asks of a client that leaves.
    pub(crate) fn close(&self) {
        let Some(session) = lock(&self.session).take() else { return };
        let _ = self.agent.delete(&self.url).header("mcp-session-id", session).call();
    }
}

fn read_messages(
    response: ureq::http::Response<ureq::Body>,
    deliver: &mut dyn FnMut(String),
) -> Result<(), String> {
    let events = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    let reader = BufReader::new(response.into_body().into_reader());
    if events {
        return sse_messages(reader, deliver);
    }
    let mut text = String::new();
    for line in reader.lines() {
        text.push_str(&line.map_err(|e| format!("the upstream's answer broke off: {e}"))?);
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(messages)) => messages.iter().for_each(|m| deliver(m.to_string())),
        _ if text.trim().is_empty() => {}
        _ => deliver(text),
    }
    Ok(())
}

/// The `data` of each server-sent event, one message each (multi-line data joined by `\n`).
fn sse_messages(reader: impl BufRead, deliver: &mut dyn FnMut(String)) -> Result<(), String> {
    let mut data: Option<String> = None;
    for line in reader.lines() {
        let line = line.map_err(|e| format!("the upstream's event stream broke off: {e}"))?;
        if line.is_empty() {
            if let Some(message) = data.take() {
                deliver(message);
            }
        } else if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_owned()),
            }
        }
    }
    if let Some(message) = data {
        deliver(message);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn each_event_is_one_message() {
        let stream = "event: message\nid: 1\ndata: {\"a\":1}\n\n: a comment\ndata: {\"b\":\ndata: 2}\n\ndata: {\"c\":3}";
        let mut got = Vec::new();
        sse_messages(stream.as_bytes(), &mut |m| got.push(m)).unwrap();
        assert_eq!(got, ["{\"a\":1}", "{\"b\":\n2}", "{\"c\":3}"]);
    }

    #[test]
    fn only_http_urls_are_taken() {
        assert!(HttpUpstream::new("ws://x").is_err_and(|e| e.contains("`ws://x`")));
        assert!(HttpUpstream::new("http://127.0.0.1:1/mcp").is_ok());
    }
}

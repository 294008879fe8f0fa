//! What a `tools/call` becomes in Airlock and what the agent hears back: the topic, labels and
//! idempotency key of its job, the reading of each answer of the API, and the next step for a
//! job in a given state. Pure: the shell in `proxy` does the I/O and reads the clock.

use airlock_policy::jcs;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

/// A tool call, read from its `params`.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The tool's name as the agent sent it.
    pub tool: String,
    /// The arguments (an object; `{}` when absent).
    pub arguments: Value,
    /// Where progress notifications go, when the agent asked for them.
    pub progress_token: Option<Value>,
}

impl Call {
    /// Reads `tools/call` params; the error is the JSON-RPC invalid-params message.
    pub fn parse(params: Option<&Value>) -> Result<Self, String> {
        let Some(Value::Object(params)) = params else {
            return Err("`tools/call` needs params with the tool's `name`".into());
        };
        let tool = match params.get("name") {
            Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
            _ => return Err("`name` must be the tool's name".into()),
        };
        if params.get("task").is_some() {
            return Err(
                "task-augmented tool calls are not supported through the Airlock proxy: call the tool \
                        without `task`"
                    .into(),
            );
        }
        let arguments = match params.get("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::Object(a)) => Value::Object(a.clone()),
            Some(_) => return Err("`arguments` must be an object".into()),
        };
        let progress_token = params
            .get("_meta")
            .and_then(|m| m.get("progressToken"))
            .filter(|t| t.is_string() || t.is_i64() || t.is_u64())
            .cloned();
        Ok(Self { tool, arguments, progress_token })
    }
}

/// One segment of a topic: lower-case letters, digits, `_` and `-`; anything else becomes `_`.
pub fn segment(name: &str) -> String {
    let segment: String = name
        .trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }
        })
        .collect();
    if segment.is_empty() { "_".into() } else { segment }
}

/// The topic of a tool's calls: `mcp.<server>.<tool>`, always three segments.
pub fn topic(server: &str, tool: &str) -> String {
    format!("mcp.{}.{}", segment(server), segment(tool))
}

/// What identifies a call within a session, whatever the generation: `sha256:` of the
/// canonical JSON of `{session, server, tool, arguments}`.
pub fn call_digest(session: &str, server: &str, tool: &str, arguments: &Value) -> String {
    let canonical = jcs::to_vec(&json!({
        "session": session, "server": server, "tool": tool, "arguments": arguments,
    }));
    let digest = Sha256::digest(&canonical);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The idempotency key of a call: the same call in the same session is the same job, until
/// that job ends without success and the agent asks again (the next generation).
pub fn idempotency_key(digest: &str, generation: u32) -> String {
    format!("mcp:{}:{generation}", digest.trim_start_matches("sha256:"))
}

/// The body of `POST /api/v1/jobs` for a call.
pub fn submission(server: &str, env: &str, call: &Call, key: &str) -> Value {
    json!({
        "topic": topic(server, &call.tool),
        "env": env,
        "labels": {"mcp_server": server, "mcp_tool": call.tool},
        "payload": call.arguments,
        "idempotency_key": key,
    })
}

/// The body of `POST /api/v1/policy/explain` asking about any call of `tool`: its job with an
/// empty payload (the principal is the key's).
pub fn explain_body(server: &str, env: &str, tool: &str) -> Value {
    json!({"job": {
        "topic": topic(server, tool),
        "env": env,
        "labels": {"mcp_server": server, "mcp_tool": tool},
        "payload": {},
    }})
}

/// Whether an explanation proves the tool denied whatever its arguments: an enforced `deny`
/// rule matched without looking at the payload (deny wins over every other decision).
pub fn denied_whatever_the_arguments(explanation: &Value) -> bool {
    explanation.get("rules").and_then(Value::as_array).is_some_and(|rules| {
        rules.iter().any(|rule| {
            rule.get("decision") == Some(&json!("deny"))
                && rule.get("mode") == Some(&json!("enforce"))
                && rule.get("verdict") == Some(&json!("matched"))
                && rule.get("reads_payload") == Some(&Value::Bool(false))
        })
    })
}

/// A tool result that tells the agent why its call did not run (or did not succeed).
pub fn tool_error(text: &str) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": true})
}

/// What Gate A's answer means for the call.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// A job exists; `replayed` when it was made by an earlier call (same idempotency key).
    Job { job_id: String, state: String, replayed: bool },
    /// The call does not run; the agent gets this tool result.
    Refused(Value),
}

/// The message an agent gets when Airlock cannot be asked.
pub const UNAVAILABLE: &str = "governance unavailable, retry later";

/// Reads the answer to the submit: status, body, and whether it was a replay.
pub fn admission(status: u16, body: &Value, replayed: bool) -> Admission {
    let text = |name: &str| body.get(name).and_then(Value::as_str).unwrap_or("");
    let rules = || {
        body.get("rule_ids")
            .and_then(Value::as_array)
            .map(|ids| ids.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    let retry = body.get("retry_after_secs").and_then(Value::as_u64);
    match status {
        202 => {
            match (body.get("job_id").and_then(Value::as_str), body.get("state").and_then(Value::as_str)) {
                (Some(id), Some(state)) => {
                    Admission::Job { job_id: id.to_owned(), state: state.to_owned(), replayed }
                }
                _ => Admission::Refused(tool_error(&format!("{UNAVAILABLE} (Airlock's answer had no job)"))),
            }
        }
        403 if text("error") == "policy_denied" => Admission::Refused(tool_error(&format!(
            "denied by Airlock policy (rules: {}): {}",
            rules(),
            text("reason")
        ))),
        429 => Admission::Refused(tool_error(&format!(
            "throttled by Airlock policy (rules: {}): {}; retry after {} s",
            rules(),
            text("reason"),
            retry.unwrap_or(1)
        ))),
        503 => Admission::Refused(tool_error(&format!(
            "{UNAVAILABLE} (retry after {} s): {}",
            retry.unwrap_or(1),
            text("message")
        ))),
        s if s >= 500 => Admission::Refused(tool_error(&format!("{UNAVAILABLE}: HTTP {s}"))),
        s => Admission::Refused(tool_error(&format!(
            "Airlock refused the call (HTTP {s}, `{}`): {}",
            text("error"),
            text("message")
        ))),
    }
}

/// What the proxy does next for a job, from the job's view (`GET /api/v1/jobs/{id}`).
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Queued: claim it (Gate B) and run it.
    Claim,
    /// Waiting for a human on this approval request.
    AwaitApproval(String),
    /// Someone else holds it (a repeat of a call already running): wait for its end.
    AwaitEnd,
    /// Ran before: its recorded result.
    Done(Value),
    /// Ended without running, or failed: this tool result.
    Ended(Value),
    /// Ended without success and found by a repeat: the agent asks again, so a new job.
    Again,
}

/// The next step for a job in `view`; `repeat` when the job was made by an earlier call.
pub fn step(view: &Value, repeat: bool) -> Step {
    let text = |name: &str| view.get(name).and_then(Value::as_str).unwrap_or("");
    let state = text("state");
    let job = text("job_id");
    match state {
        "queued" => Step::Claim,
        "awaiting_approval" => Step::AwaitApproval(text("approval_id").to_owned()),
        "leased" => Step::AwaitEnd,
        "succeeded" => match view.get("result") {
            Some(result) if result.get("truncated") == Some(&Value::Bool(true)) => {
                Step::Ended(tool_error(&format!(
                    "this call already ran as job {job}; its result was larger than Airlock keeps, so it \
                     cannot be shown again"
                )))
            }
            Some(result) => Step::Done(result.clone()),
            None => Step::Done(Value::Null),
        },
        _ if repeat => Step::Again,
        "denied" => {
            let gate_b = view.get("decisions").and_then(|d| d.get("gate_b"));
            let rules = gate_b
                .and_then(|g| g.get("rule_ids"))
                .and_then(Value::as_array)
                .map(|ids| ids.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let reason = gate_b.and_then(|g| g.get("reason")).and_then(Value::as_str).unwrap_or("");
            Step::Ended(tool_error(&format!(
                "denied by Airlock policy at dispatch (Gate B; rules: {rules}): {reason} (job {job})"
            )))
        }
        "rejected" => Step::Ended(tool_error(&format!("a human rejected this call (job {job})"))),
        "expired" => Step::Ended(tool_error(&format!("the approval of this call expired (job {job})"))),
        "cancelled" => Step::Ended(tool_error(&format!("this call was cancelled in Airlock (job {job})"))),
        "failed" | "dead_lettered" => {
            let why = view
                .get("error")
                .and_then(Value::as_str)
                .or_else(|| view.get("dead_letter_reason").and_then(Value::as_str))
                .unwrap_or("no reason recorded");
            Step::Ended(tool_error(&format!("this call failed (job {job}, {state}): {why}")))
        }
        other => {
            Step::Ended(tool_error(&format!("{UNAVAILABLE} (job {job} is in an unknown state `{other}`)")))
        }
    }
}

/// What the proxy tells an agent whose call still waits for a human when it stops waiting.
pub fn pending(approval_id: &str, job_id: &str, console: Option<&str>) -> Value {
    let at = console.map_or_else(
        || format!("with `airlock approvals approve {approval_id}`"),
        |url| format!("at {}/approvals/{approval_id}", url.trim_end_matches('/')),
    );
    tool_error(&format!(
        "pending approval {approval_id} (job {job_id}): a human must approve this call {at}; call the tool \
         again with the same arguments to continue once it is approved"
    ))
}

/// What is recorded with the job for an upstream result: the result itself, or, over
/// `bytes_max` of JSON, its size and digest (the agent still gets it whole).
pub fn recorded(result: &Value, bytes_max: usize) -> Value {
    let text = result.to_string();
    if text.len() <= bytes_max {
        return result.clone();
    }
    let digest: String = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    json!({"truncated": true, "bytes": text.len(), "sha256": format!("sha256:{digest}")})
}

/// The text of a failed tool result (`isError: true`), for the job's error.
pub fn error_text(result: &Value) -> String {
    let texts: Vec<&str> = result
        .get("content")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(|i| i.get("text").and_then(Value::as_str)).collect())
        .unwrap_or_default();
    let text = if texts.is_empty() { "the tool reported an error".to_owned() } else { texts.join("\n") };
    text.chars().take(4_096).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn a_call_needs_a_name_and_object_arguments() {
        let call = Call::parse(Some(&json!({"name": "read_file", "arguments": {"path": "/a"},
            "_meta": {"progressToken": 5}})))
        .unwrap();
        assert_eq!((call.tool.as_str(), &call.arguments), ("read_file", &json!({"path": "/a"})));
        assert_eq!(call.progress_token, Some(json!(5)));
        assert_eq!(Call::parse(Some(&json!({"name": "x"}))).unwrap().arguments, json!({}));
        assert!(Call::parse(None).unwrap_err().contains("`name`"));
        assert!(
            Call::parse(Some(&json!({"name": "x", "task": {"ttl": 1}})))
                .unwrap_err()
                .contains("task-augmented")
        );
        assert!(Call::parse(Some(&json!({"name": " "}))).unwrap_err().contains("`name`"));
        assert!(
            Call::parse(Some(&json!({"name": "x", "arguments": [1]}))).unwrap_err().contains("`arguments`")
        );
    }

    #[test]
    fn topics_are_three_segments_of_the_topic_alphabet() {
        assert_eq!(topic("fs", "read_file"), "mcp.fs.read_file");
        assert_eq!(topic("My Server", "Create.Issue/v2"), "mcp.my_server.create_issue_v2");
        assert_eq!(topic("fs", ""), "mcp.fs._");
    }

    #[test]
    fn the_key_depends_on_the_call_not_on_how_it_was_written() {
        let a = call_digest("s1", "fs", "write", &json!({"path": "/a", "n": [1, 2]}));
        let b =
            call_digest("s1", "fs", "write", &serde_json::from_str(r#"{"n":[1,2.0],"path":"/a"}"#).unwrap());
        assert_eq!(a, b);
        assert_ne!(
            a,
            call_digest("s2", "fs", "write", &json!({"path": "/a", "n": [1, 2]})),
            "another session"
        );
        assert_ne!(a, call_digest("s1", "fs", "write", &json!({"path": "/b", "n": [1, 2]})));
        assert_ne!(idempotency_key(&a, 0), idempotency_key(&a, 1));
        assert!(idempotency_key(&a, 0).starts_with("mcp:") && !idempotency_key(&a, 0).contains("sha256"));
    }

    #[test]
    fn the_job_carries_server_tool_and_arguments() {
        let call = Call::parse(Some(&json!({"name": "write_file", "arguments": {"path": "/a"}}))).unwrap();
        let body = submission("fs", "production", &call, "k");
        assert_eq!(body["topic"], "mcp.fs.write_file");
        assert_eq!(body["labels"], json!({"mcp_server": "fs", "mcp_tool": "write_file"}));
        assert_eq!(
            (&body["payload"], &body["env"], &body["idempotency_key"]),
            (&json!({"path": "/a"}), &json!("production"), &json!("k"))
        );
    }

    fn refused_text(a: Admission) -> String {
        let Admission::Refused(result) = a else { panic!("not refused: {a:?}") };
        assert_eq!(result["isError"], true);
        result["content"][0]["text"].as_str().unwrap().to_owned()
    }

    #[test]
    fn every_answer_of_gate_a_reads_as_the_agent_needs() {
        assert_eq!(
            admission(202, &json!({"job_id": "job_1", "state": "queued"}), true),
            Admission::Job { job_id: "job_1".into(), state: "queued".into(), replayed: true }
        );
        let deny = json!({"error": "policy_denied", "rule_ids": ["r1", "r2"], "reason": "no deletes"});
        assert_eq!(
            refused_text(admission(403, &deny, false)),
            "denied by Airlock policy (rules: r1, r2): no deletes"
        );
        let throttle =
            json!({"error": "throttled", "rule_ids": ["bulk"], "reason": "slow", "retry_after_secs": 42});
        assert!(refused_text(admission(429, &throttle, false)).contains("retry after 42 s"));
        let down = json!({"error": "safety_unavailable", "message": "timeout", "retry_after_secs": 1});
        assert!(refused_text(admission(503, &down, false)).starts_with(UNAVAILABLE));
        assert!(refused_text(admission(502, &Value::Null, false)).starts_with(UNAVAILABLE));
        let bad = json!({"error": "invalid_request", "message": "`topic` is too long"});
        assert!(refused_text(admission(400, &bad, false)).contains("`topic` is too long"));
    }

    #[test]
    fn each_state_leads_to_one_step() {
        let view = |state: &str| json!({"job_id": "job_1", "state": state, "approval_id": "apr_1"});
        assert_eq!(step(&view("queued"), false), Step::Claim);
        assert_eq!(step(&view("awaiting_approval"), true), Step::AwaitApproval("apr_1".into()));
        assert_eq!(step(&view("leased"), true), Step::AwaitEnd);
        let mut done = view("succeeded");
        done["result"] = json!({"content": []});
        assert_eq!(step(&done, true), Step::Done(json!({"content": []})));
        done["result"] = json!({"truncated": true});
        assert!(matches!(step(&done, true), Step::Ended(_)));
        for ended in ["denied", "rejected", "expired", "cancelled", "failed", "dead_lettered"] {
            assert_eq!(step(&view(ended), true), Step::Again, "{ended}");
            assert!(matches!(step(&view(ended), false), Step::Ended(r) if r["isError"] == true), "{ended}");
        }
        let mut denied = view("denied");
        denied["decisions"] = json!({"gate_b": {"rule_ids": ["freeze"], "reason": "change freeze"}});
        let Step::Ended(r) = step(&denied, false) else { panic!() };
        assert!(r["content"][0]["text"].as_str().unwrap().contains("Gate B; rules: freeze): change freeze"));
    }

    #[test]
    fn only_a_matched_enforced_payload_free_deny_hides_a_tool() {
        let rule = |decision: &str, mode: &str, verdict: &str, reads: bool| json!({"rules": [{"id": "r", "decision": decision, "mode": mode, "verdict": verdict, "reads_payload": reads}]});
        assert!(denied_whatever_the_arguments(&rule("deny", "enforce", "matched", false)));
        assert!(
            !denied_whatever_the_arguments(&rule("deny", "enforce", "matched", true)),
            "arguments may change it"
        );
        assert!(!denied_whatever_the_arguments(&rule("deny", "audit", "matched", false)));
        assert!(!denied_whatever_the_arguments(&rule("deny", "enforce", "not_matched", false)));
        assert!(!denied_whatever_the_arguments(&rule("require_human", "enforce", "matched", false)));
        assert!(
            !denied_whatever_the_arguments(
                &json!({"rules": [{"decision": "deny", "mode": "enforce", "verdict": "matched"}]})
            ),
            "an older server: listed"
        );
        let body = explain_body("fs", "production", "write_file");
        assert_eq!(body["job"]["topic"], "mcp.fs.write_file");
        assert_eq!(body["job"]["payload"], json!({}));
    }

    #[test]
    fn pending_says_where_to_approve() {
        let text = |v: Value| v["content"][0]["text"].as_str().unwrap().to_owned();
        assert!(
            text(pending("apr_1", "job_1", Some("http://a:8080/")))
                .contains("at http://a:8080/approvals/apr_1")
        );
        assert!(text(pending("apr_1", "job_1", None)).contains("airlock approvals approve apr_1"));
    }

    #[test]
    fn large_results_are_recorded_by_size_and_digest() {
        let small = json!({"content": [{"type": "text", "text": "hi"}]});
        assert_eq!(recorded(&small, 1_000), small);
        let big = recorded(&json!({"content": [{"type": "text", "text": "x".repeat(2_000)}]}), 1_000);
        assert_eq!(big["truncated"], true);
        assert!(big["bytes"].as_u64().unwrap() > 2_000);
        assert!(big["sha256"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!(error_text(&tool_error("boom")), "boom");
        assert_eq!(error_text(&json!({"isError": true})), "the tool reported an error");
    }
}

//! The console's HTML, rendered by maud: every value that came from an agent or a person
//! (topic, labels, payload, reasons, notes, key names) is inserted as escaped text, never as
//! markup, and no page carries inline script or style (the CSP forbids both).

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::form;
use crate::plan;
use crate::session::Session;

/// Payloads longer than this (pretty-printed, in bytes) are shown cut, in a collapsed block.
pub const PAYLOAD_SHOWN_BYTES_MAX: usize = 64 * 1024;
/// Payloads longer than this are collapsed by default.
const PAYLOAD_OPEN_BYTES_MAX: usize = 2 * 1024;

/// What every signed-in page needs from the session.
pub struct Frame<'a> {
    /// The session.
    pub session: &'a Session,
    /// Which navigation entry is current.
    pub current: &'static str,
}

/// A banner above a page's content.
pub enum Banner {
    /// Something worked.
    Done(String),
    /// Something was refused or failed.
    Error(String),
}

/// The page around a body.
pub fn layout(title: &str, frame: Option<&Frame<'_>>, banner: Option<&Banner>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Airlock" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "Airlock" }
                    @if let Some(frame) = frame {
                        nav aria-label="Main" {
                            ul {
                                (nav_item(frame, "overview", "/overview", "Overview"))
                                (nav_item(frame, "inbox", "/inbox", "Approvals"))
                                (nav_item(frame, "jobs", "/jobs", "Jobs"))
                                @if frame.session.has("operator") {
                                    (nav_item(frame, "dlq", "/dlq", "DLQ"))
                                }
                                (nav_item(frame, "policy", "/policy", "Policy"))
                            }
                        }
                        div.who {
                            span { (frame.session.principal) " · " (frame.session.tenant) " · " (frame.session.roles.join(", ")) }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(frame.session.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    @match banner {
                        Some(Banner::Done(text)) => p.banner.done role="status" { (text) },
                        Some(Banner::Error(text)) => p.banner.error role="alert" { (text) },
                        None => {},
                    }
                    (body)
                }
            }
        }
    }
}

fn nav_item(frame: &Frame<'_>, name: &str, href: &str, label: &str) -> Markup {
    html! {
        li {
            @if frame.current == name {
                a href=(href) aria-current="page" { (label) }
            } @else {
                a href=(href) { (label) }
            }
        }
    }
}

/// The sign-in page.
pub fn login(token: &str, next: &str, message: Option<&str>) -> Markup {
    let banner = message.map(|m| Banner::Error(m.to_owned()));
    layout(
        "Sign in",
        None,
        banner.as_ref(),
        html! {
            form.card method="post" action="/login" {
                input type="hidden" name="login_token" value=(token);
                input type="hidden" name="next" value=(next);
                label for="key" { "API key" }
                input #key type="password" name="key" autocomplete="off" required autofocus;
                p.hint { "The key stays on the server for this session; it never appears in a page or a URL." }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A page that only says something went wrong.
pub fn problem(title: &str, frame: Option<&Frame<'_>>, message: &str) -> Markup {
    layout(title, frame, Some(&Banner::Error(message.to_owned())), html! {})
}

/// Milliseconds as a short duration (`3d 4h`, `5m 12s`, `800ms`).
pub fn duration(ms: i64) -> String {
    let (sign, ms) = if ms < 0 { ("-", ms.unsigned_abs()) } else { ("", ms.unsigned_abs()) };
    let s = ms / 1000;
    let text = match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    };
    format!("{sign}{text}")
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, (rest % 3600) / 60, rest % 60)
}

fn time(ms: Option<i64>) -> Markup {
    html! {
        @match ms {
            Some(ms) => time { (timestamp(ms)) },
            None => "—",
        }
    }
}

/// A JSON field as text (`—` when absent or null).
pub fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "—".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A JSON field as a string slice (empty when absent).
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn i64_of(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned)).collect())
        .unwrap_or_default()
}

/// A JSON value pretty-printed, collapsed when large and cut past [`PAYLOAD_SHOWN_BYTES_MAX`].
pub fn json_block(label: &str, value: &Value) -> Markup {
    let pretty = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    let size = pretty.len();
    let mut cut = PAYLOAD_SHOWN_BYTES_MAX.min(size);
    while !pretty.is_char_boundary(cut) {
        cut -= 1;
    }
    let shown = pretty.get(..cut).unwrap_or("");
    html! {
        details.payload open[size <= PAYLOAD_OPEN_BYTES_MAX] {
            summary { (label) " (" (size) " bytes" @if cut < size { ", first " (cut) " shown" } ")" }
            pre tabindex="0" { code { (shown) } }
        }
    }
}

/// Labels as a table.
pub fn labels(value: Option<&Value>) -> Markup {
    let map = value.and_then(Value::as_object);
    html! {
        @match map {
            Some(map) if !map.is_empty() => {
                table.kv {
                    caption { "Labels" }
                    tbody {
                        @for (k, v) in map {
                            tr { th scope="row" { (k) } td { (v.as_str().map_or_else(|| v.to_string(), str::to_owned)) } }
                        }
                    }
                }
            },
            _ => p.hint { "No labels." },
        }
    }
}

/// Whether a job (as the API shows it) is a plan job decided per change: its decisions are in
/// `plan_changes`, not in one rule trace.
fn is_plan(job: &Value) -> bool {
    job.get("plan_changes").is_some_and(Value::is_array)
        && job.get("payload").and_then(|p| p.get("changes")).is_some_and(Value::is_array)
}

/// A decision as text, coloured by its kind.
fn decision_badge(decision: &str) -> Markup {
    html! { span class={ "decision " (decision) } { (decision) } }
}

/// A job's plan, when it holds one: each change's decision (for a plan job), then each change's
/// attributes before and after, and, when `explanations` (an approval's `plan_explanations`)
/// are given, every rule's verdict on it, collapsed.
pub fn plan_changes(job: &Value, explanations: Option<&Value>) -> Markup {
    let explained = explanations.and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let explanation = |c: &plan::Change| {
        explained
            .get(c.index)
            .filter(|e| e.get("address").and_then(Value::as_str) == Some(c.address.as_str()))
    };
    let plan_hash = job.get("plan_hash").and_then(Value::as_str);
    let changes = plan::changes(
        job.get("payload").unwrap_or(&Value::Null),
        job.get("plan_changes").unwrap_or(&Value::Null),
    );
    let decided = changes.shown.iter().any(|c| c.decision.is_some());
    html! {
        @if changes.total > 0 || plan_hash.is_some() {
            section aria-labelledby="plan-h" {
                h2 #plan-h { "Plan" }
                @if let Some(hash) = plan_hash { p { "Plan hash " code { (hash) } } }
                @if changes.total == 0 {
                    p.hint { "The payload carries no resource changes to show." }
                }
                @if changes.shown.len() < changes.total {
                    p.hint #plan-cut { "Showing the first " (changes.shown.len()) " of " (changes.total) " changes." }
                }
                @if decided {
                    table.grid #plan-decisions {
                        caption { "Each change's decision (" (changes.total) " changes)" }
                        thead { tr { th scope="col" { "Address" } th scope="col" { "Actions" } th scope="col" { "Decision" } th scope="col" { "Rules" } th scope="col" { "Reason" } } }
                        tbody {
                            @for c in &changes.shown {
                                tr data-address=(c.address) {
                                    th scope="row" data-label="Address" { code { (c.address) } }
                                    td data-label="Actions" { (c.actions.join(", ")) }
                                    @match &c.decision {
                                        Some(d) => {
                                            td data-label="Decision" { (decision_badge(&d.decision)) }
                                            td data-label="Rules" { @if d.rule_ids.is_empty() { "(default)" } @else { (d.rule_ids.join(", ")) } }
                                            td data-label="Reason" { (d.reason) }
                                        },
                                        None => { td data-label="Decision" { "—" } td data-label="Rules" { "—" } td data-label="Reason" { "—" } },
                                    }
                                }
                            }
                        }
                    }
                }
                @for c in &changes.shown {
                    table.plan {
                        caption {
                            (c.address) " — " (c.actions.join(", "))
                            @if let Some(d) = &c.decision { " · " (decision_badge(&d.decision)) }
                        }
                        thead { tr { th scope="col" { "Attribute" } th scope="col" { "Before" } th scope="col" { "After" } } }
                        tbody {
                            @if c.attributes.is_empty() { tr { td colspan="3" { "No attribute changes." } } }
                            @for a in &c.attributes {
                                tr {
                                    th scope="row" { (a.name) }
                                    td.before { (side(a.before.as_ref())) }
                                    td.after { (side(a.after.as_ref())) }
                                }
                            }
                        }
                    }
                    @if let Some(e) = explanation(c) {
                        details.change-trace data-address=(c.address) {
                            summary { "Every rule's verdict on " (c.address) " (topic " (str_of(e, "topic")) ")" }
                            (trace(e.get("explanation").unwrap_or(&Value::Null)))
                        }
                    }
                }
            }
        }
    }
}

fn side(v: Option<&Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The overview.
pub fn overview(o: &Value, now: i64) -> Markup {
    let jobs = o.get("jobs").and_then(Value::as_object);
    let approvals = o.get("approvals").cloned().unwrap_or(Value::Null);
    let fail_open = o.get("fail_open_last_hour").cloned().unwrap_or(Value::Null);
    html! {
        div.cards {
            section.card aria-labelledby="ov-approvals" {
                h2 #ov-approvals { "Pending approvals" }
                p.big #pending-count { (text(&approvals, "pending")) }
                p { "Oldest: " (i64_of(&approvals, "oldest_created_at").map_or("—".into(), |t| duration(now - t))) }
            }
            section.card aria-labelledby="ov-dlq" {
                h2 #ov-dlq { "DLQ depth" }
                p.big { (text(o, "dlq_depth")) }
            }
            section.card aria-labelledby="ov-breaker" {
                h2 #ov-breaker { "Safety breaker" }
                p.big { (text(o, "breaker")) }
                p { "Policy version " (text(o, "policy_version")) }
            }
            section.card aria-labelledby="ov-failopen" {
                h2 #ov-failopen { "Fail-open, last hour" }
                p.big { (fail_open.get("gate_a").and_then(Value::as_u64).unwrap_or(0) + fail_open.get("gate_b").and_then(Value::as_u64).unwrap_or(0)) }
                p { "Gate A " (text(&fail_open, "gate_a")) " · Gate B " (text(&fail_open, "gate_b")) }
            }
        }
        @if let Some(jobs) = jobs {
            table.grid {
                caption { "Jobs by state" }
                thead { tr { th scope="col" { "State" } th scope="col" { "Jobs" } } }
                tbody {
                    @for (state, n) in jobs {
                        tr { th scope="row" { a href={ "/jobs?state=" (form::encode(state)) } { (state) } } td.num { (n) } }
                    }
                }
            }
        }
    }
}

/// One inbox row's data.
pub struct InboxRow {
    /// The job summary.
    pub job: Value,
    /// Its approval request, in full (with the job view).
    pub approval: Value,
}

/// The inbox's live region: counts, then the rows.
pub fn inbox_live(
    summary: &Value,
    rows: &[InboxRow],
    next: Option<&str>,
    next_href: &str,
    now: i64,
) -> Markup {
    let oldest = i64_of(summary, "oldest_created_at");
    html! {
        p.counts #inbox-counts {
            strong #pending-count { (text(summary, "pending")) } " pending"
            " · oldest " span #oldest-age { (oldest.map_or("—".into(), |t| duration(now - t))) }
        }
        @if rows.is_empty() {
            p #inbox-empty { "Nothing awaits approval here." }
        } @else {
            table.grid #inbox-table {
                caption { "Pending approval requests, oldest first" }
                thead {
                    tr {
                        th scope="col" { "Topic" } th scope="col" { "Env" } th scope="col" { "Requester" }
                        th scope="col" { "Age" } th scope="col" { "TTL left" } th scope="col" { "Quorum" }
                        th scope="col" { "Deciding rules" } th scope="col" { "Binding" }
                    }
                }
                tbody {
                    @for row in rows { (inbox_row(row, now)) }
                }
            }
        }
        @if let Some(_next) = next {
            p { a href=(next_href) rel="next" { "Next page" } }
        }
    }
}

fn inbox_row(row: &InboxRow, now: i64) -> Markup {
    let a = &row.approval;
    let job = &row.job;
    let id = str_of(a, "id");
    let approvers = a.get("approvers").and_then(Value::as_array).map_or(0, Vec::len);
    let rules = strings(a.get("binding").and_then(|b| b.get("rule_ids")));
    let reason = a
        .get("job")
        .and_then(|j| j.get("decisions"))
        .and_then(|d| d.get("gate_a"))
        .map(|g| text(g, "reason"));
    let current = a.get("binding_current").and_then(Value::as_bool).unwrap_or(true);
    html! {
        tr data-job-id=(str_of(job, "job_id")) data-approval-id=(id) {
            td data-label="Topic" { a href={ "/approvals/" (id) } { (str_of(job, "topic")) } }
            td data-label="Env" { (str_of(job, "env")) }
            td data-label="Requester" { (str_of(a, "requested_by")) }
            td data-label="Age" { (i64_of(a, "created_at").map_or("—".into(), |t| duration(now - t))) }
            td data-label="TTL left" { (i64_of(a, "expires_at").map_or("—".into(), |t| duration(t - now))) }
            td data-label="Quorum" { (approvers) "/" (text(a, "quorum")) }
            td data-label="Rules" {
                ul.rules {
                    @for r in &rules { li { code { (r) } } }
                }
                @if let Some(reason) = &reason { span.reason { (reason) } }
            }
            td data-label="Binding" {
                @if current { span.ok { "current" } } @else { span.stale { "stale" } }
            }
        }
    }
}

/// The inbox page around its live region.
pub fn inbox(filters: &[(String, String)], live_src: &str, live: Markup) -> Markup {
    html! {
        form.filters method="get" action="/inbox" role="search" aria-label="Filter approvals" {
            (filter_input("topic", "Topic", form::first(filters, "topic")))
            (filter_input("env", "Env", form::first(filters, "env")))
            (filter_input("rule", "Rule", form::first(filters, "rule")))
            button type="submit" { "Filter" }
        }
        section #inbox-live aria-live="polite" data-live-src=(live_src) { (live) }
    }
}

fn filter_input(name: &str, label: &str, value: Option<&str>) -> Markup {
    let id = format!("f-{name}");
    html! {
        span.field {
            label for=(id) { (label) }
            input id=(id) type="text" name=(name) value=(value.unwrap_or(""));
        }
    }
}

/// The binding box of an approval (its own live region: a publish turns it stale).
pub fn binding(a: &Value, versions: &dyn Fn(&str) -> Option<u64>) -> Markup {
    let b = a.get("binding").cloned().unwrap_or(Value::Null);
    let snapshot = str_of(&b, "snapshot");
    let current = a.get("binding_current").and_then(Value::as_bool).unwrap_or(false);
    let pending = str_of(a, "status") == "pending";
    let rules = strings(b.get("rule_ids"));
    let hashes = strings(b.get("rule_hashes"));
    html! {
        dl.kv {
            dt { "Job hash" } dd { code { (str_of(&b, "job_hash")) } }
            dt { "Snapshot" } dd {
                @if let Some(v) = versions(snapshot) { "version " (v) " · " }
                code { (snapshot) }
            }
            dt { "Rules" } dd {
                ul.rules {
                    @for (i, r) in rules.iter().enumerate() {
                        li { code { (r) } @if let Some(h) = hashes.get(i) { " " code.hash { (h) } } }
                    }
                }
            }
            dt { "Status" } dd {
                @if !pending {
                    span #binding-state.muted { "not pending (" (str_of(a, "status")) ")" }
                } @else if current {
                    span #binding-state.ok { "current — approving now binds to this job and snapshot" }
                } @else {
                    span #binding-state.stale { "stale — " (text(a, "stale_reason")) }
                }
            }
        }
    }
}

/// The explain trace: every rule's verdict.
pub fn trace(e: &Value) -> Markup {
    let rules = e.get("rules").and_then(Value::as_array).cloned().unwrap_or_default();
    html! {
        p {
            "Decision " strong.decision { (text(e, "decision")) }
            " by " (strings(e.get("rule_ids")).join(", "))
            @if let Some(reason) = e.get("reason").and_then(Value::as_str) { " — " span.reason { (reason) } }
        }
        @let errors = e.get("errors").and_then(Value::as_array).cloned().unwrap_or_default();
        @if !errors.is_empty() {
            ul.errors { @for err in &errors { li { code { (text(err, "rule_id")) } ": " (text(err, "error")) } } }
        }
        table.grid.trace {
            caption { "Every rule's verdict" }
            thead { tr { th scope="col" { "Rule" } th scope="col" { "Decision" } th scope="col" { "Mode" } th scope="col" { "Verdict" } th scope="col" { "Why" } } }
            tbody {
                @for r in &rules {
                    tr class=(str_of(r, "verdict")) {
                        th scope="row" { code { (str_of(r, "id")) } }
                        td { (str_of(r, "decision")) } td { (str_of(r, "mode")) }
                        td { (str_of(r, "verdict")) } td { (text(r, "detail")) }
                    }
                }
            }
        }
    }
}

/// What an approver may do on a request, and why not when they may not.
pub enum Actions {
    /// Approve and reject forms.
    Decide,
    /// Only a reason.
    Refused(String),
}

/// The approval detail page.
pub fn approval(
    a: &Value,
    session: &Session,
    actions: &Actions,
    binding_box: Markup,
    now: i64,
    comment: &str,
) -> Markup {
    let job = a.get("job").cloned().unwrap_or(Value::Null);
    let id = str_of(a, "id");
    let approvers = strings(a.get("approvers"));
    html! {
        section aria-labelledby="req-h" {
            h2 #req-h { "Request" }
            dl.kv {
                dt { "Topic" } dd { (str_of(&job, "topic")) }
                dt { "Env" } dd { (str_of(&job, "env")) }
                dt { "Requester" } dd { (str_of(a, "requested_by")) }
                dt { "Status" } dd #approval-status { (str_of(a, "status")) }
                dt { "Age" } dd { (i64_of(a, "created_at").map_or("—".into(), |t| duration(now - t))) }
                dt { "TTL left" } dd { (i64_of(a, "expires_at").map_or("—".into(), |t| duration(t - now))) }
                dt { "Quorum" } dd { (approvers.len()) "/" (text(a, "quorum")) @if !approvers.is_empty() { " (" (approvers.join(", ")) ")" } }
                dt { "Job" } dd { a href={ "/jobs/" (str_of(&job, "job_id")) } { code { (str_of(&job, "job_id")) } } " · " (str_of(&job, "state")) }
            }
        }
        section aria-labelledby="bind-h" {
            h2 #bind-h { "Binding" }
            div #binding-live aria-live="polite" data-live-src={ "/approvals/" (id) "?fragment=binding" } { (binding_box) }
        }
        section aria-labelledby="act-h" {
            h2 #act-h { "Decide" }
            @match actions {
                Actions::Refused(why) => p #not-approvable { (why) },
                Actions::Decide => {
                    div.actions {
                        form method="post" action={ "/approvals/" (id) "/approve" } {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button #approve type="submit" { "Approve" }
                        }
                        form method="post" action={ "/approvals/" (id) "/reject" } {
                            input type="hidden" name="csrf" value=(session.csrf);
                            label for="comment" { "Why reject (required)" }
                            textarea #comment name="comment" rows="2" required { (comment) }
                            button #reject.danger type="submit" { "Reject" }
                        }
                    }
                }
            }
        }
        section aria-labelledby="dec-h" {
            h2 #dec-h { "Decision under the active policy" }
            @if is_plan(&job) {
                @let d = a.get("current_decision").unwrap_or(&Value::Null);
                p #plan-decision {
                    "Decision " strong.decision { (text(d, "decision")) }
                    " by " (strings(d.get("rule_ids")).join(", "))
                    @if let Some(reason) = d.get("reason").and_then(Value::as_str) { " — " span.reason { (reason) } }
                }
                p.hint { "A plan is decided change by change: the most restrictive change decides it. Each change's decision, rules and reason are under Plan below." }
            } @else if let Some(e) = a.get("explanation") {
                (trace(e))
            }
        }
        section aria-labelledby="job-h" {
            h2 #job-h { "Job" }
            (labels(job.get("labels")))
            (json_block("Payload", job.get("payload").unwrap_or(&Value::Null)))
        }
        (plan_changes(&job, a.get("plan_explanations")))
    }
}

/// The job list page.
pub fn jobs(filters: &[(String, String)], jobs: &[Value], next_href: Option<&str>, now: i64) -> Markup {
    const STATES: [&str; 10] = [
        "awaiting_approval",
        "queued",
        "leased",
        "succeeded",
        "failed",
        "denied",
        "rejected",
        "expired",
        "cancelled",
        "dead_lettered",
    ];
    let chosen = form::first(filters, "state").unwrap_or("");
    html! {
        form.filters method="get" action="/jobs" role="search" aria-label="Filter jobs" {
            span.field {
                label for="f-state" { "State" }
                select #f-state name="state" {
                    option value="" selected[chosen.is_empty()] { "any" }
                    @for s in STATES { option value=(s) selected[chosen == s] { (s) } }
                }
            }
            (filter_input("topic", "Topic", form::first(filters, "topic")))
            (filter_input("env", "Env", form::first(filters, "env")))
            button type="submit" { "Filter" }
        }
        @if jobs.is_empty() {
            p { "No jobs match." }
        } @else {
            table.grid #jobs-table {
                caption { "Jobs, oldest first" }
                thead { tr { th scope="col" { "Job" } th scope="col" { "Topic" } th scope="col" { "Env" } th scope="col" { "State" } th scope="col" { "Submitter" } th scope="col" { "Age" } } }
                tbody {
                    @for j in jobs {
                        tr data-job-id=(str_of(j, "job_id")) {
                            td data-label="Job" { a href={ "/jobs/" (str_of(j, "job_id")) } { code { (str_of(j, "job_id")) } } }
                            td data-label="Topic" { (str_of(j, "topic")) }
                            td data-label="Env" { (str_of(j, "env")) }
                            td data-label="State" { span class={ "state " (str_of(j, "state")) } { (str_of(j, "state")) } }
                            td data-label="Submitter" { (str_of(j, "principal")) }
                            td data-label="Age" { (i64_of(j, "created_at").map_or("—".into(), |t| duration(now - t))) }
                        }
                    }
                }
            }
        }
        @if let Some(href) = next_href { p { a href=(href) rel="next" { "Next page" } } }
    }
}

/// One step of a job's timeline.
struct Step {
    at: i64,
    what: Markup,
}

/// Audit kinds a job's timeline already shows as a state change or a gate decision.
const SHOWN_AS_STEPS: [&str; 4] = ["job.submitted", "job.transition", "gate_b.decision", "gate_b.throttled"];

/// The job detail page: a timeline of history, gate decisions, the job's other audit records
/// (`audit`, empty for roles that do not read the trail) and the outcome.
pub fn job(j: &Value, audit: &[Value], now: i64) -> Markup {
    let mut steps: Vec<Step> = Vec::new();
    for t in j.get("history").and_then(Value::as_array).into_iter().flatten() {
        steps.push(Step {
            at: i64_of(t, "at").unwrap_or(0),
            what: html! {
                span.kind { "state" } " "
                @if let Some(from) = t.get("from").and_then(Value::as_str) { (from) " → " }
                strong { (str_of(t, "to")) } " by " (str_of(t, "actor")) " — " (str_of(t, "reason"))
            },
        });
    }
    for d in j.get("gate_decisions").and_then(Value::as_array).into_iter().flatten() {
        steps.push(Step {
            at: i64_of(d, "at").unwrap_or(0),
            what: html! {
                span.kind { "gate " (text(d, "gate").to_uppercase()) } " " strong { (text(d, "decision")) }
                @if let Some(o) = d.get("outcome").and_then(Value::as_str) { " (" (o) ")" }
                " " (strings(d.get("rule_ids")).join(", "))
                @if let Some(r) = d.get("reason").and_then(Value::as_str) { " — " span.reason { (r) } }
                @if d.get("bypassed").and_then(Value::as_bool) == Some(true) { " " span.stale { "fail-open bypass" } }
                " · snapshot " (text(d, "snapshot_version")) " · audit #" (text(d, "audit_seq"))
            },
        });
    }
    for r in audit.iter().filter(|r| !SHOWN_AS_STEPS.contains(&str_of(r, "kind"))) {
        let data = r.get("data").unwrap_or(&Value::Null);
        let why = data.get("comment").or_else(|| data.get("reason")).and_then(Value::as_str);
        steps.push(Step {
            at: i64_of(r, "at").unwrap_or(0),
            what: html! {
                span.kind { "audit" } " " strong { (str_of(r, "kind")) } " by " (str_of(r, "actor"))
                @if let Some(why) = why { " — " span.reason { (why) } }
                " · audit #" (text(r, "seq"))
            },
        });
    }
    steps.sort_by_key(|s| s.at);
    let attempts = j.get("attempts").cloned().unwrap_or(Value::Null);
    html! {
        dl.kv {
            dt { "State" } dd #job-state { span class={ "state " (str_of(j, "state")) } { (str_of(j, "state")) } }
            dt { "Topic" } dd { (str_of(j, "topic")) }
            dt { "Env" } dd { (str_of(j, "env")) }
            dt { "Submitter" } dd { (str_of(j, "principal")) }
            dt { "Job hash" } dd { code { (str_of(j, "job_hash")) } }
            dt { "Idempotency key" } dd { (text(j, "idempotency_key")) }
            dt { "Attempts" } dd { "scheduling " (text(&attempts, "scheduling")) " · execution " (text(&attempts, "execution")) }
            dt { "Lease" } dd {
                @match j.get("lease").filter(|l| !l.is_null()) {
                    Some(l) => { (str_of(l, "holder")) " until " (time(i64_of(l, "expires_at"))) },
                    None => "—",
                }
            }
            @if let Some(a) = j.get("approval_id").and_then(Value::as_str) {
                dt { "Approval" } dd { a href={ "/approvals/" (a) } { code { (a) } } }
            }
            @if let Some(r) = j.get("dead_letter_reason").and_then(Value::as_str) {
                dt { "Dead-letter reason" } dd { (r) }
            }
            @if let Some(e) = j.get("error").and_then(Value::as_str) {
                dt { "Last error" } dd.error { (e) }
            }
            dt { "Age" } dd { (i64_of(j, "created_at").map_or("—".into(), |t| duration(now - t))) }
        }
        section aria-labelledby="tl-h" {
            h2 #tl-h { "Timeline" }
            ol.timeline #timeline {
                @for s in &steps { li { (time(Some(s.at))) " " (s.what) } }
            }
        }
        @if let Some(result) = j.get("result").filter(|r| !r.is_null()) {
            section aria-labelledby="res-h" { h2 #res-h { "Result" } (json_block("Result", result)) }
        }
        section aria-labelledby="jp-h" {
            h2 #jp-h { "Content" }
            (labels(j.get("labels")))
            (json_block("Payload", j.get("payload").unwrap_or(&Value::Null)))
        }
        (plan_changes(j, None))
    }
}

/// The DLQ page: entries grouped by reason, with single and bulk retry and discard.
pub fn dlq(entries: &[Value], session: &Session, next_href: Option<&str>) -> Markup {
    let mut groups: Vec<(String, usize)> = Vec::new();
    for e in entries {
        let reason = text(e, "reason");
        match groups.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => groups.push((reason, 1)),
        }
    }
    html! {
        @if entries.is_empty() {
            p #dlq-empty { "The dead-letter queue is empty." }
        } @else {
            table.grid #dlq-groups {
                caption { "By reason (this page)" }
                thead { tr { th scope="col" { "Reason" } th scope="col" { "Jobs" } } }
                tbody { @for (r, n) in &groups { tr { th scope="row" { (r) } td.num { (n) } } } }
            }
            form method="post" action="/dlq/confirm" {
                input type="hidden" name="csrf" value=(session.csrf);
                table.grid #dlq-table {
                    caption { "Dead-lettered jobs" }
                    thead { tr { th scope="col" { "Select" } th scope="col" { "Job" } th scope="col" { "Topic" } th scope="col" { "Reason" } th scope="col" { "Attempts" } th scope="col" { "Act" } } }
                    tbody {
                        @for e in entries {
                            @let id = str_of(e, "job_id");
                            tr data-job-id=(id) {
                                td { input type="checkbox" name="ids" value=(id) aria-label={ "select " (id) }; }
                                td data-label="Job" { a href={ "/jobs/" (id) } { code { (id) } } }
                                td data-label="Topic" { (str_of(e, "topic")) }
                                td data-label="Reason" { (text(e, "reason")) }
                                td data-label="Attempts" { (text(e, "scheduling_attempts")) " / " (text(e, "execution_attempts")) }
                                td.row-actions {
                                    button type="submit" name="single" value={ "retry " (id) } { "Retry" }
                                    button.danger type="submit" name="single" value={ "discard " (id) } { "Discard" }
                                }
                            }
                        }
                    }
                }
                div.actions {
                    button #bulk-retry type="submit" name="action" value="retry" { "Retry selected" }
                    button #bulk-discard.danger type="submit" name="action" value="discard" { "Discard selected" }
                }
            }
        }
        @if let Some(href) = next_href { p { a href=(href) rel="next" { "Next page" } } }
    }
}

/// The confirmation step of a DLQ action.
pub fn dlq_confirm(action: &str, ids: &[&str], session: &Session) -> Markup {
    let verb =
        if action == "retry" { "Retry (through Gate B again)" } else { "Discard (kept, out of the DLQ)" };
    html! {
        p { (verb) ": " strong { (ids.len()) " job(s)" } }
        ul { @for id in ids { li { code { (id) } } } }
        form method="post" action="/dlq/apply" {
            input type="hidden" name="csrf" value=(session.csrf);
            input type="hidden" name="action" value=(action);
            @for id in ids { input type="hidden" name="ids" value=(id); }
            div.actions {
                button #confirm type="submit" { "Confirm " (action) }
                a href="/dlq" { "Cancel" }
            }
        }
    }
}

/// The policy page: snapshots, the diff form, simulate.
pub fn policy(list: &Value, session: &Session) -> Markup {
    let snapshots = list.get("snapshots").and_then(Value::as_array).cloned().unwrap_or_default();
    let newest = snapshots.first().and_then(|s| i64_of(s, "version")).unwrap_or(1);
    html! {
        table.grid #snapshots {
            caption { "Snapshots, newest first" }
            thead { tr { th scope="col" { "Version" } th scope="col" { "Hash" } th scope="col" { "Author" } th scope="col" { "Note" } th scope="col" { "Published" } th scope="col" { "Active" } } }
            tbody {
                @for s in &snapshots {
                    tr {
                        th scope="row" { a href={ "/policy/snapshots/" (text(s, "version")) } { (text(s, "version")) } }
                        td { code.hash { (str_of(s, "hash")) } }
                        td { (str_of(s, "created_by")) }
                        td { (text(s, "note")) }
                        td { (time(i64_of(s, "created_at"))) }
                        td { @if s.get("active").and_then(Value::as_bool) == Some(true) { "active" } }
                    }
                }
            }
        }
        section aria-labelledby="diff-h" {
            h2 #diff-h { "Compare two snapshots" }
            @if session.has("operator") {
                form.filters method="get" action="/policy/diff" {
                    span.field { label for="from" { "From version" } input #from type="number" name="from" min="1" value=((newest - 1).max(1)); }
                    span.field { label for="to" { "To version" } input #to type="number" name="to" min="1" value=(newest); }
                    button type="submit" { "Diff" }
                }
            } @else {
                p.hint { "Snapshot sources are readable by operators and admins." }
            }
        }
        p { a href="/policy/simulate" { "Simulate a job" } }
    }
}

/// One snapshot's source.
pub fn snapshot(s: &Value) -> Markup {
    html! {
        dl.kv {
            dt { "Hash" } dd { code { (str_of(s, "hash")) } }
            dt { "Author" } dd { (str_of(s, "created_by")) }
            dt { "Note" } dd { (text(s, "note")) }
            dt { "Published" } dd { (time(i64_of(s, "created_at"))) }
        }
        @match s.get("source").and_then(Value::as_str) {
            Some(source) => pre.source tabindex="0" { code { (source) } },
            None => p.hint { "The source is readable by operators and admins; you see the version and hash." },
        }
    }
}

/// A line diff between two snapshot sources.
pub fn diff(from: &Value, to: &Value) -> Markup {
    let (a, b) = (str_of(from, "source"), str_of(to, "source"));
    let text_diff = similar::TextDiff::from_lines(a, b);
    let (mut added, mut removed) = (0usize, 0usize);
    let lines: Vec<(similar::ChangeTag, String)> = text_diff
        .iter_all_changes()
        .map(|c| {
            match c.tag() {
                similar::ChangeTag::Insert => added += 1,
                similar::ChangeTag::Delete => removed += 1,
                similar::ChangeTag::Equal => {}
            }
            (c.tag(), c.value().trim_end_matches('\n').to_owned())
        })
        .collect();
    html! {
        p #diff-summary {
            "Version " (text(from, "version")) " (" code.hash { (str_of(from, "hash")) } ") → version " (text(to, "version"))
            " (" code.hash { (str_of(to, "hash")) } "): " (added) " line(s) added, " (removed) " removed"
            @if str_of(from, "hash") == str_of(to, "hash") { " — same canonical policy" }
        }
        pre.diff tabindex="0" {
            @for (tag, line) in &lines {
                @match tag {
                    similar::ChangeTag::Insert => { ins { "+ " (line) } "\n" },
                    similar::ChangeTag::Delete => { del { "- " (line) } "\n" },
                    similar::ChangeTag::Equal => { span { "  " (line) } "\n" },
                }
            }
        }
    }
}

/// The simulate form, and the trace when one was asked for.
pub fn simulate(
    job_text: &str,
    policy_text: &str,
    may_candidate: bool,
    session: &Session,
    result: Option<&Value>,
) -> Markup {
    html! {
        form method="post" action="/policy/simulate" {
            input type="hidden" name="csrf" value=(session.csrf);
            label for="job" { "Job (JSON: topic, env, labels, payload)" }
            textarea #job name="job" rows="8" required { (job_text) }
            @if may_candidate {
                label for="candidate" { "Candidate policy (YAML; empty: the active snapshot)" }
                textarea #candidate name="policy" rows="10" { (policy_text) }
            }
            button type="submit" { "Simulate" }
        }
        @if let Some(r) = result {
            section #sim-result aria-labelledby="sim-h" { h2 #sim-h { "Result" } (trace(r)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_timestamps() {
        assert_eq!(duration(800), "800ms");
        assert_eq!(duration(59_000), "59s");
        assert_eq!(duration(61_000), "1m 1s");
        assert_eq!(duration(3_600_000 * 25), "1d 1h");
        assert_eq!(duration(-2_000), "-2s");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(timestamp(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
    }

    #[test]
    fn agent_text_is_escaped() {
        let payload =
            serde_json::json!({"x": "<script>alert(1)</script>", "y": "\"><img src=x onerror=alert(1)>"});
        let out = json_block("Payload", &payload).into_string();
        assert!(!out.contains("<script>") && !out.contains("<img"), "{out}");
        assert!(out.contains("&lt;script&gt;"));
    }

    #[test]
    fn large_payloads_are_cut_and_collapsed() {
        let big = serde_json::json!({"blob": "x".repeat(PAYLOAD_SHOWN_BYTES_MAX * 4)});
        let out = json_block("Payload", &big).into_string();
        assert!(out.len() < PAYLOAD_SHOWN_BYTES_MAX + 1_000);
        assert!(out.contains("<details class=\"payload\">"), "collapsed: {}", out.get(..200).unwrap_or(""));
    }
}

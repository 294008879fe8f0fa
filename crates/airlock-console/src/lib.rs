//! Airlock's operator console (SPEC 11, 15): server-rendered pages at `/` for approvers and
//! operators — approvals inbox and detail, jobs, DLQ, policy, overview — with live updates by
//! server-sent events. Its only way to the domain is the HTTP API, called in process with the
//! signed-in key ([`api`]); sessions live on the server ([`session`]); every asset is compiled
//! into the binary and every page is served with a strict Content-Security-Policy.

mod api;
mod form;
mod pages;
mod plan;
mod session;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_core::defaults;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde_json::{Value, json};

use crate::api::{Answer, Api, Failure};
use crate::pages::{Actions, Banner, Frame, InboxRow};
use crate::session::{LOGIN_COOKIE, Lookup, SESSION_COOKIE, Session, Sessions};

/// The Content-Security-Policy of every console response: only this origin's script, style
/// and connections; no inline script or style, no framing, forms post only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Inbox rows per page.
const INBOX_PAGE: u32 = 25;
/// Jobs per page.
const JOBS_PAGE: u32 = 50;
/// Pages of awaiting jobs read to fill one inbox page when filtering by rule.
const RULE_FILTER_PAGES_MAX: usize = 10;
/// An open event stream sends a comment this often, so proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// How the console runs.
pub struct Settings {
    /// Mark cookies `Secure` (the listener serves TLS).
    pub secure_cookies: bool,
    /// A session ends after this long without a request.
    pub session_idle: Duration,
    /// A session ends this long after sign-in.
    pub session_absolute: Duration,
    /// Becomes `true` when the server shuts down: open event streams end, so that graceful
    /// shutdown is not held up by them.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl Settings {
    /// The defaults of SPEC 13's table, with `closing` as the shutdown signal.
    pub fn new(closing: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            secure_cookies: false,
            session_idle: Duration::from_millis(defaults::CONSOLE_SESSION_IDLE_MS),
            session_absolute: Duration::from_millis(defaults::CONSOLE_SESSION_ABSOLUTE_MS),
            closing,
        }
    }
}

#[derive(Clone)]
struct Console(Arc<Inner>);

struct Inner {
    api: Api,
    sessions: Sessions,
    secure_cookies: bool,
    closing: tokio::sync::watch::Receiver<bool>,
}

/// The API router with the console mounted at `/`: the console's routes answer, everything
/// else goes to the API unchanged.
pub fn with_console(api: Router, settings: Settings) -> Router {
    let console = Console(Arc::new(Inner {
        api: Api::new(api.clone()),
        sessions: Sessions::new(settings.session_idle, settings.session_absolute),
        secure_cookies: settings.secure_cookies,
        closing: settings.closing,
    }));
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/overview", get(overview))
        .route("/inbox", get(inbox))
        .route("/approvals/{id}", get(approval))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/reject", post(reject))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/dlq", get(dlq))
        .route("/dlq/confirm", post(dlq_confirm))
        .route("/dlq/apply", post(dlq_apply))
        .route("/policy", get(policy))
        .route("/policy/snapshots/{version}", get(snapshot))
        .route("/policy/diff", get(diff))
        .route("/policy/simulate", get(simulate_form).post(simulate))
        .route("/events", get(events))
        .route("/assets/console.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/assets/console.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
        .fallback_service(api)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], markup.into_string()).into_response()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// Where sign-in sends the person back to: the page asked for.
fn to_login(uri: &Uri, expired: bool) -> Response {
    let here = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut target = format!("/login?next={}", form::encode(here));
    if expired {
        target.push_str("&expired=1");
    }
    Redirect::to(&target).into_response()
}

impl Console {
    fn cookie_attrs(&self) -> &'static str {
        if self.0.secure_cookies {
            "; HttpOnly; SameSite=Strict; Secure"
        } else {
            "; HttpOnly; SameSite=Strict"
        }
    }

    /// The request's session; otherwise the redirect to sign-in (keeping the page asked for).
    fn session(&self, headers: &HeaderMap, uri: &Uri) -> Result<(Session, String), Box<Response>> {
        let Some(id) = cookie(headers, SESSION_COOKIE) else { return Err(Box::new(to_login(uri, false))) };
        match self.0.sessions.get(id, Instant::now()) {
            Ok(s) => Ok((s, id.to_owned())),
            // A cookie for a session this process does not hold: it timed out, was ended (its
            // key revoked) or the server restarted; either way the person signs in again.
            Err(Lookup::Expired | Lookup::Missing) => Err(Box::new(to_login(uri, !id.is_empty()))),
        }
    }

    /// A failure as the response to send: a refused key ends the session.
    fn fail(&self, id: &str, uri: &Uri, failure: Failure) -> Response {
        match failure {
            Failure::SignedOut => {
                self.0.sessions.close(id);
                to_login(uri, true)
            }
            Failure::Broken(message) => {
                tracing::warn!(%message, "console: API call failed");
                html(StatusCode::BAD_GATEWAY, pages::problem("Unavailable", None, &message))
            }
        }
    }
}

/// A signed-in POST: the session, its id and the form's fields.
type Posted = (Session, String, Vec<(String, String)>);

/// A signed-in POST form: the session and the form's fields, after the CSRF check.
fn posted(c: &Console, headers: &HeaderMap, uri: &Uri, body: &Bytes) -> Result<Posted, Box<Response>> {
    let (session, id) = c.session(headers, uri)?;
    let fields = form::parse(&String::from_utf8_lossy(body));
    let token = form::first(&fields, "csrf").unwrap_or("");
    if token.is_empty() || !session::same_token(token, &session.csrf) {
        return Err(Box::new(html(
            StatusCode::FORBIDDEN,
            pages::problem(
                "Refused",
                None,
                "this form's CSRF token is missing or wrong; reload the page and try again",
            ),
        )));
    }
    Ok((session, id, fields))
}

fn page(
    title: &str,
    session: &Session,
    current: &'static str,
    banner: Option<&Banner>,
    body: Markup,
) -> Response {
    let frame = Frame { session, current };
    html(StatusCode::OK, pages::layout(title, Some(&frame), banner, body))
}

fn api_problem(title: &str, session: &Session, current: &'static str, answer: &Answer) -> Response {
    let frame = Frame { session, current };
    let status = StatusCode::from_u16(answer.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    html(status, pages::problem(title, Some(&frame), &answer.message()))
}

/// Runs an API-backed handler body; `?` on a [`Failure`] inside turns into the right response.
macro_rules! api {
    ($c:expr, $id:expr, $uri:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(f) => return $c.fail(&$id, &$uri, f),
        }
    };
}

async fn home(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    match c.session(&headers, &uri) {
        Ok((s, _)) if s.has("approver") && !s.has("operator") => Redirect::to("/inbox").into_response(),
        Ok(_) => Redirect::to("/overview").into_response(),
        Err(r) => *r,
    }
}

async fn login_form(State(c): State<Console>, uri: Uri) -> Response {
    let query = form::parse(uri.query().unwrap_or(""));
    let next = form::first(&query, "next").filter(|n| form::local_path(n)).unwrap_or("/");
    let message = form::first(&query, "expired").map(|_| "Your session ended; sign in again to continue.");
    login_page(&c, next, message, StatusCode::OK)
}

fn login_page(c: &Console, next: &str, message: Option<&str>, status: StatusCode) -> Response {
    let token = match c.0.sessions.issue_login_token(Instant::now()) {
        Ok(t) => t,
        Err(e) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::problem("Error", None, &format!("no randomness: {e}")),
            );
        }
    };
    let mut response = html(status, pages::login(&token, next, message));
    let cookie = format!("{LOGIN_COOKIE}={token}; Path=/login; Max-Age=900{}", c.cookie_attrs());
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

async fn login(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let fields = form::parse(&String::from_utf8_lossy(&body));
    let next = form::first(&fields, "next").filter(|n| form::local_path(n)).unwrap_or("/").to_owned();
    let token = form::first(&fields, "login_token").unwrap_or("");
    if !c.0.sessions.take_login_token(token, cookie(&headers, LOGIN_COOKIE).unwrap_or(""), Instant::now()) {
        return html(
            StatusCode::FORBIDDEN,
            pages::problem(
                "Refused",
                None,
                "this sign-in form's CSRF token is missing, used or expired; load the sign-in page again",
            ),
        );
    }
    let key = form::first(&fields, "key").map(str::trim).unwrap_or("");
    if key.is_empty() {
        return login_page(&c, &next, Some("Enter an API key."), StatusCode::BAD_REQUEST);
    }
    let answer = match c.0.api.call_raw(Some(key), Method::GET, "/api/v1/overview", None).await {
        Ok(a) => a,
        Err(Failure::Broken(m)) => return login_page(&c, &next, Some(&m), StatusCode::BAD_GATEWAY),
        Err(Failure::SignedOut) => {
            return login_page(&c, &next, Some("Unknown or revoked API key."), StatusCode::UNAUTHORIZED);
        }
    };
    if !answer.ok() {
        let message = if answer.status == StatusCode::UNAUTHORIZED {
            "Unknown or revoked API key.".to_owned()
        } else {
            answer.message()
        };
        return login_page(&c, &next, Some(&message), StatusCode::UNAUTHORIZED);
    }
    let b = &answer.body;
    let roles = b
        .get("roles")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let id = match c.0.sessions.open(
        key.to_owned(),
        pages::str_of(b, "principal").to_owned(),
        pages::str_of(b, "tenant").to_owned(),
        roles,
        Instant::now(),
    ) {
        Ok(id) => id,
        Err(e) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::problem("Error", None, &format!("no randomness: {e}")),
            );
        }
    };
    tracing::info!(principal = %pages::str_of(b, "principal"), "console sign-in");
    let mut response = Redirect::to(&next).into_response();
    let set = [
        format!("{SESSION_COOKIE}={id}; Path=/{}", c.cookie_attrs()),
        format!("{LOGIN_COOKIE}=; Path=/login; Max-Age=0{}", c.cookie_attrs()),
    ];
    for v in set.iter().filter_map(|s| HeaderValue::from_str(s).ok()) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

async fn logout(State(c): State<Console>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    let (_, id, _) = match posted(&c, &headers, &uri, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    c.0.sessions.close(&id);
    let mut response = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("{SESSION_COOKIE}=; Path=/; Max-Age=0{}", c.cookie_attrs()))
    {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

async fn overview(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let answer = api!(c, id, uri, c.0.api.get(&s.key, "/api/v1/overview").await);
    if !answer.ok() {
        return api_problem("Overview", &s, "overview", &answer);
    }
    page("Overview", &s, "overview", None, pages::overview(&answer.body, now_ms()))
}

/// The inbox rows for a query: awaiting jobs (filtered by topic and env in the API, by deciding
/// rule here), each with its approval request.
async fn inbox_rows(
    c: &Console,
    s: &Session,
    q: &[(String, String)],
) -> Result<Result<(Vec<InboxRow>, Option<String>), Answer>, Failure> {
    let rule = form::filled(q, "rule");
    let limit = if rule.is_some() { defaults::PAGE_SIZE_MAX } else { INBOX_PAGE };
    let mut after = form::filled(q, "after").map(str::to_owned);
    let mut picked: Vec<Value> = Vec::new();
    let mut next = None;
    for _ in 0..RULE_FILTER_PAGES_MAX {
        let limit_text = limit.to_string();
        let uri = format!(
            "/api/v1/jobs{}",
            form::query(&[
                ("state", Some("awaiting_approval")),
                ("topic", form::filled(q, "topic")),
                ("env", form::filled(q, "env")),
                ("after", after.as_deref()),
                ("limit", Some(&limit_text)),
            ])
        );
        let answer = c.0.api.get(&s.key, &uri).await?;
        if !answer.ok() {
            return Ok(Err(answer));
        }
        let page = answer.body.get("jobs").and_then(Value::as_array).cloned().unwrap_or_default();
        next = answer.body.get("next").and_then(Value::as_str).map(str::to_owned);
        for job in page {
            if picked.len() == INBOX_PAGE as usize {
                break;
            }
            let rules = job.get("rule_ids").and_then(Value::as_array);
            let keep =
                rule.is_none_or(|r| rules.is_some_and(|ids| ids.iter().any(|i| i.as_str() == Some(r))));
            next = Some(pages::str_of(&job, "job_id").to_owned());
            if keep {
                picked.push(job);
            }
        }
        if picked.len() == INBOX_PAGE as usize || answer.body.get("next").is_none_or(Value::is_null) {
            if answer.body.get("next").is_none_or(Value::is_null) && picked.len() < INBOX_PAGE as usize {
                next = None;
            }
            break;
        }
        after.clone_from(&next);
    }
    let mut rows = Vec::with_capacity(picked.len());
    for job in picked {
        let Some(approval_id) = job.get("approval_id").and_then(Value::as_str) else { continue };
        let answer = c.0.api.get(&s.key, &format!("/api/v1/approvals/{}", form::encode(approval_id))).await?;
        if answer.ok() {
            rows.push(InboxRow { job, approval: answer.body });
        }
    }
    Ok(Ok((rows, next)))
}

async fn inbox(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = form::parse(uri.query().unwrap_or(""));
    let summary = api!(c, id, uri, c.0.api.get(&s.key, "/api/v1/approvals/summary").await);
    if !summary.ok() {
        return api_problem("Approvals", &s, "inbox", &summary);
    }
    let (rows, next) = match api!(c, id, uri, inbox_rows(&c, &s, &q).await) {
        Ok(found) => found,
        Err(answer) => return api_problem("Approvals", &s, "inbox", &answer),
    };
    let filters = |after: Option<&str>, fragment: bool| {
        form::query(&[
            ("topic", form::filled(&q, "topic")),
            ("env", form::filled(&q, "env")),
            ("rule", form::filled(&q, "rule")),
            ("after", after),
            ("fragment", fragment.then_some("1")),
        ])
    };
    let next_href = format!("/inbox{}", filters(next.as_deref(), false));
    let live = pages::inbox_live(&summary.body, &rows, next.as_deref(), &next_href, now_ms());
    if form::first(&q, "fragment").is_some() {
        return html(StatusCode::OK, maud::html! { div { (live) } });
    }
    let live_src = format!("/inbox{}", filters(form::filled(&q, "after"), true));
    page("Approvals", &s, "inbox", None, pages::inbox(&q, &live_src, live))
}

/// Snapshot hashes to versions, for showing what a binding was made under.
async fn versions(c: &Console, s: &Session) -> Result<Vec<(String, u64)>, Failure> {
    let answer = c.0.api.get(&s.key, "/api/v1/policy/snapshots").await?;
    Ok(answer
        .body
        .get("snapshots")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v.get("hash")?.as_str()?.to_owned(), v.get("version")?.as_u64()?)))
        .collect())
}

async fn approval(
    State(c): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Path(approval_id): Path<String>,
) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = form::parse(uri.query().unwrap_or(""));
    let banner = match form::first(&q, "done") {
        Some("approved") => Some(Banner::Done("Approved.".into())),
        Some("voted") => Some(Banner::Done("Your approval was counted; the quorum needs more.".into())),
        Some("rejected") => Some(Banner::Done("Rejected.".into())),
        _ => None,
    };
    approval_page(
        &c,
        &s,
        &id,
        &uri,
        &approval_id,
        banner,
        "",
        StatusCode::OK,
        form::first(&q, "fragment") == Some("binding"),
    )
    .await
}

#[expect(clippy::too_many_arguments, reason = "the page's inputs, each distinct")]
async fn approval_page(
    c: &Console,
    s: &Session,
    id: &str,
    uri: &Uri,
    approval_id: &str,
    banner: Option<Banner>,
    comment: &str,
    status: StatusCode,
    binding_only: bool,
) -> Response {
    let answer = api!(
        c,
        id,
        uri,
        c.0.api.get(&s.key, &format!("/api/v1/approvals/{}", form::encode(approval_id))).await
    );
    if !answer.ok() {
        return api_problem("Approval", s, "inbox", &answer);
    }
    let known = api!(c, id, uri, versions(c, s).await);
    let lookup = |hash: &str| known.iter().find(|(h, _)| h == hash).map(|(_, v)| *v);
    let a = &answer.body;
    let binding_box = pages::binding(a, &lookup);
    if binding_only {
        return html(StatusCode::OK, maud::html! { div { (binding_box) } });
    }
    let pending = pages::str_of(a, "status") == "pending";
    let actions = if !pending {
        Actions::Refused(format!(
            "This request is {}; there is nothing to decide.",
            pages::str_of(a, "status")
        ))
    } else if !s.has("approver") {
        Actions::Refused("Your key lacks the approver role: you can review but not decide.".into())
    } else if pages::str_of(a, "requested_by") == s.principal {
        Actions::Refused(format!(
            "You ({}) submitted this job: its approval must come from someone else.",
            s.principal
        ))
    } else if a
        .get("approvers")
        .and_then(Value::as_array)
        .is_some_and(|v| v.iter().any(|p| p.as_str() == Some(&s.principal)))
    {
        Actions::Refused("You already approved this request; the quorum needs another approver.".into())
    } else {
        Actions::Decide
    };
    let frame = Frame { session: s, current: "inbox" };
    let title = format!("Approval for {}", pages::str_of(a.get("job").unwrap_or(&Value::Null), "topic"));
    let body = pages::approval(a, s, &actions, binding_box, now_ms(), comment);
    html(status, pages::layout(&title, Some(&frame), banner.as_ref(), body))
}

async fn approve(
    State(c): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Path(approval_id): Path<String>,
    body: Bytes,
) -> Response {
    let (s, id, _) = match posted(&c, &headers, &uri, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let path = format!("/api/v1/approvals/{}/approve", form::encode(&approval_id));
    let answer = api!(c, id, uri, c.0.api.post(&s.key, &path, &json!({})).await);
    decided(&c, &s, &id, &uri, &approval_id, &answer, "").await
}

async fn reject(
    State(c): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Path(approval_id): Path<String>,
    body: Bytes,
) -> Response {
    let (s, id, fields) = match posted(&c, &headers, &uri, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Some(comment) = form::filled(&fields, "comment") else {
        let banner = Banner::Error("A rejection needs a comment saying why.".into());
        return approval_page(
            &c,
            &s,
            &id,
            &uri,
            &approval_id,
            Some(banner),
            "",
            StatusCode::BAD_REQUEST,
            false,
        )
        .await;
    };
    let path = format!("/api/v1/approvals/{}/reject", form::encode(&approval_id));
    let answer = api!(c, id, uri, c.0.api.post(&s.key, &path, &json!({"comment": comment})).await);
    decided(&c, &s, &id, &uri, &approval_id, &answer, comment).await
}

/// After approve or reject: back to the request with what happened; a stale answer points to
/// the request that replaced it.
async fn decided(
    c: &Console,
    s: &Session,
    id: &str,
    uri: &Uri,
    approval_id: &str,
    answer: &Answer,
    comment: &str,
) -> Response {
    if answer.ok() {
        let done = match answer.body.get("remaining").and_then(Value::as_u64) {
            Some(n) if n > 0 => "voted",
            Some(_) => "approved",
            None => "rejected",
        };
        return Redirect::to(&format!("/approvals/{}?done={done}", form::encode(approval_id)))
            .into_response();
    }
    let mut message = format!("Refused ({}): {}", answer.code(), answer.message());
    if let Some(new_id) = answer.body.get("new_approval_id").and_then(Value::as_str) {
        message.push_str(&format!(
            " A new request bound to the current job and policy is open: /approvals/{new_id}"
        ));
        let frame = Frame { session: s, current: "inbox" };
        let body = maud::html! {
            p { a #new-approval href={ "/approvals/" (new_id) } { "Review the new request" } }
        };
        return html(
            answer.status,
            pages::layout("Approval refused: stale", Some(&frame), Some(&Banner::Error(message)), body),
        );
    }
    let status = StatusCode::from_u16(answer.status.as_u16()).unwrap_or(StatusCode::CONFLICT);
    approval_page(c, s, id, uri, approval_id, Some(Banner::Error(message)), comment, status, false).await
}

async fn jobs(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = form::parse(uri.query().unwrap_or(""));
    let limit = JOBS_PAGE.to_string();
    let filters = |after: Option<&str>| {
        form::query(&[
            ("state", form::filled(&q, "state")),
            ("topic", form::filled(&q, "topic")),
            ("env", form::filled(&q, "env")),
            ("after", after),
        ])
    };
    let api_uri = format!(
        "/api/v1/jobs{}",
        form::query(&[
            ("state", form::filled(&q, "state")),
            ("topic", form::filled(&q, "topic")),
            ("env", form::filled(&q, "env")),
            ("after", form::filled(&q, "after")),
            ("limit", Some(&limit)),
        ])
    );
    let answer = api!(c, id, uri, c.0.api.get(&s.key, &api_uri).await);
    if !answer.ok() {
        return api_problem("Jobs", &s, "jobs", &answer);
    }
    let list = answer.body.get("jobs").and_then(Value::as_array).cloned().unwrap_or_default();
    let next = answer.body.get("next").and_then(Value::as_str).map(|n| format!("/jobs{}", filters(Some(n))));
    page("Jobs", &s, "jobs", None, pages::jobs(&q, &list, next.as_deref(), now_ms()))
}

async fn job(State(c): State<Console>, headers: HeaderMap, uri: Uri, Path(job_id): Path<String>) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let answer =
        api!(c, id, uri, c.0.api.get(&s.key, &format!("/api/v1/jobs/{}", form::encode(&job_id))).await);
    if !answer.ok() {
        return api_problem("Job", &s, "jobs", &answer);
    }
    // The job's other audit records (votes, stale or expired approvals, operator actions) are
    // in its timeline for the roles that read the audit trail.
    let audit = if s.has("operator") || s.has("viewer") {
        let path = format!("/api/v1/audit?job={}&limit={}", form::encode(&job_id), defaults::PAGE_SIZE_MAX);
        let records = api!(c, id, uri, c.0.api.get(&s.key, &path).await);
        records.body.get("records").and_then(Value::as_array).cloned().unwrap_or_default()
    } else {
        Vec::new()
    };
    let title = format!("Job {}", pages::str_of(&answer.body, "topic"));
    page(&title, &s, "jobs", None, pages::job(&answer.body, &audit, now_ms()))
}

async fn dlq_entries(c: &Console, s: &Session, q: &[(String, String)]) -> Result<Answer, Failure> {
    let max = defaults::PAGE_SIZE_MAX.to_string();
    let uri = format!(
        "/api/v1/dlq{}",
        form::query(&[
            ("topic", form::filled(q, "topic")),
            ("after", form::filled(q, "after")),
            ("limit", Some(&max))
        ])
    );
    c.0.api.get(&s.key, &uri).await
}

async fn dlq(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = form::parse(uri.query().unwrap_or(""));
    dlq_page(&c, &s, &id, &uri, &q, None).await
}

async fn dlq_page(
    c: &Console,
    s: &Session,
    id: &str,
    uri: &Uri,
    q: &[(String, String)],
    banner: Option<Banner>,
) -> Response {
    let answer = api!(c, id, uri, dlq_entries(c, s, q).await);
    if !answer.ok() {
        return api_problem("Dead-letter queue", s, "dlq", &answer);
    }
    let entries = answer.body.get("dead_letters").and_then(Value::as_array).cloned().unwrap_or_default();
    let next =
        answer.body.get("next").and_then(Value::as_str).map(|n| {
            format!("/dlq{}", form::query(&[("topic", form::filled(q, "topic")), ("after", Some(n))]))
        });
    page("Dead-letter queue", s, "dlq", banner.as_ref(), pages::dlq(&entries, s, next.as_deref()))
}

/// The action and job ids a DLQ form asks for: one row's button, or the bulk buttons.
fn dlq_request(fields: &[(String, String)]) -> Result<(&str, Vec<&str>), &'static str> {
    let (action, ids) = match form::first(fields, "single").and_then(|v| v.split_once(' ')) {
        Some((action, id)) => (action, vec![id]),
        None => (form::first(fields, "action").unwrap_or(""), form::all(fields, "ids")),
    };
    if !matches!(action, "retry" | "discard") {
        return Err("choose retry or discard");
    }
    if ids.is_empty() {
        return Err("select at least one job");
    }
    Ok((action, ids))
}

async fn dlq_confirm(State(c): State<Console>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    let (s, id, fields) = match posted(&c, &headers, &uri, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match dlq_request(&fields) {
        Ok((action, ids)) => page("Confirm", &s, "dlq", None, pages::dlq_confirm(action, &ids, &s)),
        Err(why) => {
            dlq_page(&c, &s, &id, &uri, &[], Some(Banner::Error(format!("Nothing done: {why}.")))).await
        }
    }
}

async fn dlq_apply(State(c): State<Console>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    let (s, id, fields) = match posted(&c, &headers, &uri, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let (action, ids) = match dlq_request(&fields) {
        Ok(r) => r,
        Err(why) => {
            return dlq_page(&c, &s, &id, &uri, &[], Some(Banner::Error(format!("Nothing done: {why}."))))
                .await;
        }
    };
    let (mut done, mut refused) = (0usize, Vec::new());
    for job_id in &ids {
        let path = format!("/api/v1/dlq/{}/{action}", form::encode(job_id));
        let answer = api!(c, id, uri, c.0.api.post(&s.key, &path, &json!({})).await);
        if answer.ok() {
            done += 1;
        } else {
            refused.push(format!("{job_id}: {}", answer.message()));
        }
    }
    let verb = if action == "retry" { "retried (back through Gate B)" } else { "discarded" };
    let banner = if refused.is_empty() {
        Banner::Done(format!("{done} job(s) {verb}."))
    } else {
        Banner::Error(format!("{done} job(s) {verb}; refused: {}", refused.join("; ")))
    };
    dlq_page(&c, &s, &id, &uri, &[], Some(banner)).await
}

async fn policy(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let answer = api!(c, id, uri, c.0.api.get(&s.key, "/api/v1/policy/snapshots").await);
    if !answer.ok() {
        return api_problem("Policy", &s, "policy", &answer);
    }
    page("Policy", &s, "policy", None, pages::policy(&answer.body, &s))
}

async fn snapshot(
    State(c): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Path(version): Path<String>,
) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let answer = api!(
        c,
        id,
        uri,
        c.0.api.get(&s.key, &format!("/api/v1/policy/snapshots/{}", form::encode(&version))).await
    );
    if !answer.ok() {
        return api_problem("Snapshot", &s, "policy", &answer);
    }
    page(
        &format!("Snapshot {}", pages::text(&answer.body, "version")),
        &s,
        "policy",
        None,
        pages::snapshot(&answer.body),
    )
}

async fn diff(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = form::parse(uri.query().unwrap_or(""));
    let mut sides = Vec::new();
    for side in ["from", "to"] {
        let Some(v) = form::filled(&q, side).filter(|v| v.parse::<u64>().is_ok()) else {
            let frame = Frame { session: &s, current: "policy" };
            return html(
                StatusCode::BAD_REQUEST,
                pages::problem("Diff", Some(&frame), &format!("`{side}` must be a snapshot version number")),
            );
        };
        let answer = api!(c, id, uri, c.0.api.get(&s.key, &format!("/api/v1/policy/snapshots/{v}")).await);
        if !answer.ok() {
            return api_problem("Diff", &s, "policy", &answer);
        }
        if answer.body.get("source").is_none() {
            let frame = Frame { session: &s, current: "policy" };
            return html(
                StatusCode::FORBIDDEN,
                pages::problem("Diff", Some(&frame), "snapshot sources are readable by operators and admins"),
            );
        }
        sides.push(answer.body);
    }
    let (Some(from), Some(to)) = (sides.first(), sides.get(1)) else {
        return html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::problem("Diff", None, "two snapshots expected"),
        );
    };
    let title = format!("Diff: version {} → {}", pages::text(from, "version"), pages::text(to, "version"));
    page(&title, &s, "policy", None, pages::diff(from, to))
}

const EXAMPLE_JOB: &str = r#"{
  "topic": "infra.resource.delete",
  "env": "production",
  "labels": {},
  "payload": {"resource": "db-1"}
}"#;

async fn simulate_form(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, _) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    page("Simulate", &s, "policy", None, pages::simulate(EXAMPLE_JOB, "", s.has("operator"), &s, None))
}

async fn simulate(State(c): State<Console>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    let (s, id, fields) = match posted(&c, &headers, &uri, &body) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let job_text = form::first(&fields, "job").unwrap_or("");
    let policy_text = form::first(&fields, "policy").unwrap_or("");
    let render = |banner: Option<Banner>, result: Option<&Value>, status: StatusCode| {
        let frame = Frame { session: &s, current: "policy" };
        let body = pages::simulate(job_text, policy_text, s.has("operator"), &s, result);
        html(status, pages::layout("Simulate", Some(&frame), banner.as_ref(), body))
    };
    let job: Value = match serde_json::from_str(job_text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return render(
                Some(Banner::Error("the job must be a JSON object".into())),
                None,
                StatusCode::BAD_REQUEST,
            );
        }
        Err(e) => {
            return render(
                Some(Banner::Error(format!("the job is not JSON: {e}"))),
                None,
                StatusCode::BAD_REQUEST,
            );
        }
    };
    let mut question = json!({"job": job});
    if !policy_text.trim().is_empty() {
        if !s.has("operator") {
            return render(
                Some(Banner::Error("only operators may simulate a candidate policy".into())),
                None,
                StatusCode::FORBIDDEN,
            );
        }
        if let Some(q) = question.as_object_mut() {
            q.insert("policy".into(), json!(policy_text));
        }
    }
    let answer = api!(c, id, uri, c.0.api.post(&s.key, "/api/v1/policy/explain", &question).await);
    if !answer.ok() {
        let status = StatusCode::from_u16(answer.status.as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
        return render(Some(Banner::Error(answer.message())), None, status);
    }
    render(None, Some(&answer.body), StatusCode::OK)
}

/// One open event stream's state.
struct Live {
    console: Console,
    session: Session,
    id: String,
    /// The summary last sent (`None` before the first).
    last: Option<Value>,
    /// When something was last sent.
    beat: Instant,
    /// `signed_out` was sent: the stream ends.
    ended: bool,
}

/// `GET /events`: server-sent events for the open page. Every few hundred milliseconds the
/// stream asks the API for the tenant's approval summary and policy version, and sends `change`
/// when they moved; the page then fetches its live regions again. A refused key sends
/// `signed_out` and ends the stream.
async fn events(State(c): State<Console>, headers: HeaderMap, uri: Uri) -> Response {
    let (s, id) = match c.session(&headers, &uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let poll = Duration::from_millis(defaults::CONSOLE_LIVE_POLL_MS);
    let signed_out = || Ok::<_, Infallible>(Bytes::from_static(b"event: signed_out\ndata: {}\n\n"));
    let start = Live { console: c, session: s, id, last: None, beat: Instant::now(), ended: false };
    let stream = futures_util::stream::unfold(start, move |mut live| async move {
        if live.ended {
            return None;
        }
        let mut closing = live.console.0.closing.clone();
        loop {
            if *closing.borrow() {
                return None;
            }
            if live.last.is_some() {
                tokio::select! {
                    () = tokio::time::sleep(poll) => {}
                    _ = closing.changed() => return None,
                }
            }
            if !live.console.0.sessions.peek(&live.id, Instant::now()) {
                live.ended = true;
                return Some((signed_out(), live));
            }
            let answer = match live.console.0.api.get(&live.session.key, "/api/v1/approvals/summary").await {
                Err(Failure::SignedOut) => {
                    live.console.0.sessions.close(&live.id);
                    live.ended = true;
                    return Some((signed_out(), live));
                }
                Err(Failure::Broken(_)) => {
                    live.last.get_or_insert(Value::Null);
                    continue;
                }
                Ok(a) => a,
            };
            let now = if answer.ok() { answer.body } else { json!({"status": answer.status.as_u16()}) };
            if live.last.as_ref() != Some(&now) {
                let event = format!("event: change\ndata: {now}\n\n");
                live.last = Some(now);
                live.beat = Instant::now();
                return Some((Ok(Bytes::from(event)), live));
            }
            if live.beat.elapsed() >= KEEPALIVE {
                live.beat = Instant::now();
                return Some((Ok(Bytes::from_static(b": keepalive\n\n")), live));
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-store")],
        Body::from_stream(stream),
    )
        .into_response()
}

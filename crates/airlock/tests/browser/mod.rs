//! A small W3C WebDriver client over ureq, driving Debian's `chromium` headless through
//! `chromedriver`, plus what the console's browser tests share: signing in, waiting for the
//! page, axe-core accessibility checks and screenshots. The tools are required: a test fails
//! (never skips) when `chromedriver`, `chromium` or axe-core is missing.

#![allow(dead_code, reason = "each test file uses the part it needs")]
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a test fails by panicking"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Process, wait_reachable};

/// The key WebDriver names elements by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// WebDriver key codes.
pub const TAB: &str = "\u{E004}";
pub const ENTER: &str = "\u{E007}";

/// Where `.ci/run` installs axe-core, under `$HOME` (`AIRLOCK_AXE_JS` overrides).
const AXE_UNDER_HOME: &str = ".cache/airlock/npm-console/node_modules/axe-core/axe.min.js";

/// The two viewport sizes every page is checked and photographed at.
pub const VIEWPORTS: [(u32, u32, &str); 2] = [(1280, 800, "desktop"), (390, 844, "mobile")];

fn tool(name: &str, env: &str, default: &str) -> String {
    let path = std::env::var(env).unwrap_or_else(|_| default.to_owned());
    assert!(
        Path::new(&path).exists(),
        "`{name}` is required for the console's browser tests and was not found at `{path}` \
         (install it with `.ci/run`, or set {env})"
    );
    path
}

/// A chromedriver process of this test.
pub struct Chromedriver {
    _process: Process,
    base: String,
}

impl Chromedriver {
    /// Starts `chromedriver` on a free loopback port.
    pub fn start() -> Self {
        let binary = tool("chromedriver", "AIRLOCK_CHROMEDRIVER", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let process = Process(child);
        let addr = format!("127.0.0.1:{port}");
        assert!(wait_reachable(&addr, Duration::from_secs(10)), "chromedriver did not listen on {addr}");
        Self { _process: process, base: format!("http://{addr}") }
    }

    /// A new headless Chromium at 1280×800.
    pub fn browser(&self) -> Browser {
        let chromium = tool("chromium", "AIRLOCK_CHROMIUM", "/usr/bin/chromium");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(90)))
            .build()
            .into();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--hide-scrollbars", "--force-device-scale-factor=1"],
            },
        }}});
        let value = send(&agent, "POST", &format!("{}/session", self.base), Some(&caps))
            .unwrap_or_else(|e| panic!("chromium did not start through chromedriver: {e}"));
        let id = value["sessionId"].as_str().expect("a session id").to_owned();
        let browser = Browser { agent, base: format!("{}/session/{id}", self.base) };
        browser.cmd("POST", "/timeouts", Some(&json!({"script": 60_000, "pageLoad": 60_000, "implicit": 0})));
        browser
    }
}

fn send(agent: &ureq::Agent, method: &str, url: &str, body: Option<&Value>) -> Result<Value, String> {
    let response = match (method, body) {
        ("POST", Some(b)) => agent.post(url).send_json(b),
        ("POST", None) => agent.post(url).send_json(json!({})),
        ("DELETE", _) => agent.delete(url).call(),
        _ => agent.get(url).call(),
    }
    .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.into_body().read_to_string().map_err(|e| e.to_string())?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("{method} {url}: {e}: {text}"))?;
    let value = value.get("value").cloned().unwrap_or(Value::Null);
    if status >= 400 {
        return Err(format!("{} ({status}): {}", value["error"], value["message"]));
    }
    Ok(value)
}

/// One browser session.
pub struct Browser {
    agent: ureq::Agent,
    base: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = send(&self.agent, "DELETE", &self.base, None);
    }
}

impl Browser {
    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        send(&self.agent, method, &format!("{}{path}", self.base), body)
            .unwrap_or_else(|e| panic!("webdriver: {e}"))
    }

    fn try_cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        send(&self.agent, method, &format!("{}{path}", self.base), body)
    }

    /// Loads a URL and waits for it.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({"url": url})));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap_or_default().to_owned()
    }

    /// The element matching `css`, if any now.
    pub fn try_find(&self, css: &str) -> Option<String> {
        match self.try_cmd("POST", "/element", Some(&json!({"using": "css selector", "value": css}))) {
            Ok(v) => {
                Some(v[ELEMENT].as_str().unwrap_or_else(|| panic!("an element reference: {v}")).to_owned())
            }
            Err(e) if e.contains("no such element") => None,
            Err(e) => panic!("finding `{css}`: {e}"),
        }
    }

    /// The element matching `css`, waiting up to 10 s for it.
    pub fn find(&self, css: &str) -> String {
        self.wait_for(css, Duration::from_secs(10))
    }

    /// The element matching `css`, waiting up to `within`.
    pub fn wait_for(&self, css: &str, within: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(e) = self.try_find(css) {
                return e;
            }
            if started.elapsed() >= within {
                let dom = self.exec("return document.documentElement.outerHTML.slice(0, 3000)", json!([]));
                panic!("no `{css}` on {} within {within:?}; the page: {dom}", self.url());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the text of `css` contains `needle`; the text.
    pub fn wait_text(&self, css: &str, needle: &str, within: Duration) -> String {
        let started = Instant::now();
        loop {
            let text = self.try_find(css).map(|e| self.text(&e)).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            assert!(
                started.elapsed() < within,
                "`{css}` never said `{needle}` (last: `{text}`) on {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Clicks an element.
    pub fn click(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/click"), Some(&json!({})));
    }

    /// Clicks the element matching `css`.
    pub fn click_css(&self, css: &str) {
        let e = self.find(css);
        self.click(&e);
    }

    /// Types into an element.
    pub fn type_into(&self, element: &str, text: &str) {
        self.cmd("POST", &format!("/element/{element}/value"), Some(&json!({"text": text})));
    }

    /// An element's visible text.
    pub fn text(&self, element: &str) -> String {
        self.try_cmd("GET", &format!("/element/{element}/text"), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Runs a script in the page; its return value.
    pub fn exec(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", Some(&json!({"script": script, "args": args})))
    }

    /// Presses keys (WebDriver key codes or text) on whatever has focus.
    pub fn keys(&self, keys: &[&str]) {
        let mut actions = Vec::new();
        for key in keys {
            for c in key.chars() {
                actions.push(json!({"type": "keyDown", "value": c.to_string()}));
                actions.push(json!({"type": "keyUp", "value": c.to_string()}));
            }
        }
        self.cmd(
            "POST",
            "/actions",
            Some(&json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        );
        self.cmd("DELETE", "/actions", None);
    }

    /// The id attribute of the focused element.
    pub fn focused_id(&self) -> String {
        self.exec("return document.activeElement ? document.activeElement.id : ''", json!([]))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Whether a JavaScript dialog (alert, confirm, prompt) is open.
    pub fn dialog_open(&self) -> bool {
        self.try_cmd("GET", "/alert/text", None).is_ok()
    }

    /// Forgets every cookie (signs out without the form).
    pub fn clear_cookies(&self) {
        self.cmd("DELETE", "/cookie", None);
    }

    /// Sets the viewport size (what the page lays out in, and what screenshots show).
    pub fn resize(&self, width: u32, height: u32) {
        let params = json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600});
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(&json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": params})),
        );
    }

    /// Signs in at `base` with `key`, from the sign-in page.
    pub fn sign_in(&self, base: &str, key: &str) {
        self.goto(&format!("{base}/login"));
        self.sign_in_here(key);
    }

    /// Fills and posts the sign-in form already on screen.
    pub fn sign_in_here(&self, key: &str) {
        let field = self.find("#key");
        self.type_into(&field, key);
        self.click_css("form.card button[type=submit]");
        self.find("header.top nav");
    }

    /// Injects axe-core and fails on any serious or critical violation of the page.
    pub fn axe(&self, page: &str) {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let default = format!("{home}/{AXE_UNDER_HOME}");
        let source = std::fs::read_to_string(tool("axe-core", "AIRLOCK_AXE_JS", &default)).unwrap();
        let defined = self.exec("return typeof window.axe", json!([]));
        if defined != json!("object") {
            self.exec(&format!("{source}\n;window.axe = axe; return true;"), json!([]));
        }
        let script = "const done = arguments[arguments.length - 1];\
            axe.run(document).then(r => done(r.violations\
              .filter(v => v.impact === 'serious' || v.impact === 'critical')\
              .map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))))\
              .catch(e => done([{id: 'axe-error', help: String(e)}]));";
        let violations = self.cmd("POST", "/execute/async", Some(&json!({"script": script, "args": []})));
        assert_eq!(violations, json!([]), "axe-core found serious or critical violations on {page}");
    }

    /// Checks the page with axe at both viewport sizes and saves a screenshot of each as
    /// `NAME-WIDTHxHEIGHT.png` ([`screenshot_path`]); ends at 1280×800.
    pub fn check_page(&self, name: &str) {
        for (width, height, _) in VIEWPORTS {
            self.resize(width, height);
            self.axe(&format!("{name} at {width}×{height}"));
            self.screenshot(&screenshot_path(name, width, height));
        }
        self.resize(1280, 800);
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        let data = self.cmd("GET", "/screenshot", None);
        let bytes = base64_decode(data.as_str().expect("base64 screenshot"));
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Checks that nothing an agent sent became markup: no dialog, no injected element.
    pub fn assert_inert(&self, page: &str) {
        assert!(!self.dialog_open(), "a dialog opened on {page}");
        let injected = self.exec(
            "return document.querySelectorAll('img[src=\"x\"], script:not([src]), [onerror], a[href^=\"javascript\"], iframe').length",
            json!([]),
        );
        assert_eq!(injected, json!(0), "an injected element exists on {page}");
        assert_eq!(
            self.exec("return window.__pwned === undefined", json!([])),
            json!(true),
            "a script ran on {page}"
        );
    }
}

/// Where the screenshots of a page go: `AIRLOCK_SCREENSHOTS_DIR` (relative to the workspace;
/// `docs/console` refreshes the committed set), or else this build's scratch directory, so that
/// a test run leaves the tree clean.
pub fn screenshot_path(name: &str, width: u32, height: u32) -> PathBuf {
    let dir = match std::env::var("AIRLOCK_SCREENSHOTS_DIR") {
        Ok(dir) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir),
        Err(_) => Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots"),
    };
    dir.join(format!("{name}-{width}x{height}.png"))
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | u32::from(*d) << (18 - 6 * i));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

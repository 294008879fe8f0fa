//! `airlock serve --tls-cert/--tls-key [--tls-client-ca]` through the real binary, with
//! certificates the test generates (rcgen): HTTPS is served and plain HTTP is not, SIGHUP
//! swaps in a renewed certificate, and with a client CA only clients holding a certificate it
//! signed get an answer.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic, reason = "a test fails by panicking")]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

mod support;

/// A CA that signs the server's and the clients' certificates.
struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.0).unwrap().pem(), key.serialize_pem())
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.0.pem()).unwrap();
        path
    }
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path, tls: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.join("store"))
        .args(tls)
        .env("AIRLOCK_ADMIN_KEY", "tls-admin-key-0123456789")
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let addr = line.strip_prefix("airlock listening on https://").unwrap_or_else(|| panic!("{line}"));
    let addr = addr.split_whitespace().next().unwrap().to_owned();
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, addr }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

/// `GET /healthz` over TLS trusting `ca` (optionally with a client certificate): the response
/// text and the server's certificate, or the error.
/// `GET path` over TLS: the whole answer and the certificate the server presented.
fn https_get(
    addr: &str,
    ca: &Ca,
    client: Option<&(String, String)>,
    path: &str,
) -> Result<(String, Vec<u8>), String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.0.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(pem_certs(cert), PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
            .unwrap(),
    };
    let connection =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    match tls.read_to_string(&mut text) {
        Ok(_) => {}
        Err(e) if !text.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.to_string()),
    }
    let presented =
        tls.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    Ok((text, presented))
}

#[test]
fn https_is_served_and_sighup_swaps_the_certificate() {
    let data = support::temp_dir("tls-reload");
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (cert_file, key_file) = (data.join("cert.pem"), data.join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let server =
        serve(&data, &["--tls-cert", cert_file.to_str().unwrap(), "--tls-key", key_file.to_str().unwrap()]);

    let (text, presented) = https_get(&server.addr, &ca, None, "/healthz").unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(presented, pem_certs(&cert)[0].to_vec());

    // The console's cookies are `Secure` when the listener serves TLS.
    let (login, _) = https_get(&server.addr, &ca, None, "/login").unwrap();
    let cookie = login.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap_or("");
    assert!(cookie.contains("; Secure"), "{login}");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(&server.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    let _ = plain.read_to_end(&mut seen);
    assert!(!String::from_utf8_lossy(&seen).contains("HTTP/1.1 200"), "plain HTTP was answered");

    // Renew: new key and certificate in the same files, then SIGHUP.
    let (renewed, renewed_key) = ca.leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(&cert_file, &renewed).unwrap();
    std::fs::write(&key_file, &renewed_key).unwrap();
    Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (text, presented) = https_get(&server.addr, &ca, None, "/healthz").unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        if presented == pem_certs(&renewed)[0].to_vec() {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not swap in the renewed certificate");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken renewal keeps the certificate in use.
    std::fs::write(&cert_file, "not a certificate").unwrap();
    Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (text, presented) = https_get(&server.addr, &ca, None, "/healthz").unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(presented, pem_certs(&renewed)[0].to_vec());
}

#[test]
fn with_a_client_ca_only_clients_it_signed_are_answered() {
    let data = support::temp_dir("tls-mutual");
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(data.join("cert.pem"), &cert).unwrap();
    std::fs::write(data.join("key.pem"), &key).unwrap();
    let ca_file = ca.write(&data);
    let path = |name: &str| data.join(name).to_str().unwrap().to_owned();
    let server = serve(
        &data,
        &[
            "--tls-cert",
            &path("cert.pem"),
            "--tls-key",
            &path("key.pem"),
            "--tls-client-ca",
            ca_file.to_str().unwrap(),
        ],
    );
    let worker = ca.leaf(&["worker-1"], ExtendedKeyUsagePurpose::ClientAuth);
    let (text, _) = https_get(&server.addr, &ca, Some(&worker), "/healthz").unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        https_get(&server.addr, &ca, None, "/healthz").is_err(),
        "a client without a certificate was answered"
    );
    let stranger = Ca::new().leaf(&["intruder"], ExtendedKeyUsagePurpose::ClientAuth);
    assert!(
        https_get(&server.addr, &ca, Some(&stranger), "/healthz").is_err(),
        "a certificate of another CA was accepted"
    );
}

#[test]
fn bad_tls_files_stop_the_start_with_a_clear_error() {
    let data = support::temp_dir("tls-bad");
    std::fs::write(data.join("cert.pem"), "garbage").unwrap();
    std::fs::write(data.join("key.pem"), "garbage").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.join("store"))
        .args([
            "--tls-cert",
            data.join("cert.pem").to_str().unwrap(),
            "--tls-key",
            data.join("key.pem").to_str().unwrap(),
        ])
        .env("AIRLOCK_ADMIN_KEY", "tls-admin-key-0123456789")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cert.pem"), "{stderr}");
}

/// A NATS server of this test's own serving only TLS with `cert`/`key`, verifying client
/// certificates against `client_ca`, with JetStream stored under `dir`; its address.
fn tls_nats(dir: &Path, cert: &Path, key: &Path, client_ca: &Path) -> (support::Process, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(support::NATS_BIN)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("jetstream"))
        .arg("--tls")
        .arg("--tlscert")
        .arg(cert)
        .arg("--tlskey")
        .arg(key)
        .arg("--tlsverify")
        .arg("--tlscacert")
        .arg(client_ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let process = support::Process(child);
    assert!(support::wait_reachable(&addr, Duration::from_secs(10)), "nats-server did not start");
    (process, addr)
}

/// `serve --store … --bus tls://…` with `bus_tls`: the running replica and its address, or
/// the process's exit status and stderr when it stopped instead (within 20 s).
fn bus_replica(store: &str, nats: &str, stream: &str, bus_tls: &[&Path]) -> Result<Server, String> {
    let flags = ["--bus-ca", "--bus-cert", "--bus-key"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
        .args(["--bus", &format!("tls://{nats}"), "--bus-stream", stream])
        .args(
            flags.iter().zip(bus_tls).flat_map(|(flag, path)| [std::ffi::OsStr::new(flag), path.as_os_str()]),
        )
        .env("AIRLOCK_ADMIN_KEY", "tls-admin-key-0123456789")
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    match lines.next() {
        Some(Ok(line)) if line.contains("listening on http://") => {
            let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            Ok(Server { child, addr })
        }
        _ => {
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                assert!(Instant::now() < deadline, "the replica neither served nor stopped");
                std::thread::sleep(Duration::from_millis(50));
            };
            let mut stderr = String::new();
            child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            Err(format!("{status}: {stderr}"))
        }
    }
}

#[test]
fn the_job_bus_runs_over_tls_and_a_wrong_ca_is_refused() {
    let dir = support::temp_dir("tls-bus");
    let ca = Ca::new();
    let ca_file = ca.write(&dir);
    let write = |name: &str, (cert, key): (String, String)| {
        let (cert_file, key_file) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        (cert_file, key_file)
    };
    let (server_cert, server_key) =
        write("nats", ca.leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth));
    let (client_cert, client_key) =
        write("airlock", ca.leaf(&["airlock"], ExtendedKeyUsagePurpose::ClientAuth));
    let (_nats, nats) = tls_nats(&dir, &server_cert, &server_key, &ca_file);
    let schema = support::Schema::create("tlsbus");
    let stream = format!("AIRLOCK_TLS_{}", std::process::id());

    // With the CA and a client certificate it signed, the relay publishes over TLS: the outbox
    // row of a submitted job is deleted only once JetStream acknowledged its wake-up.
    let replica = bus_replica(&schema.url(), &nats, &stream, &[&ca_file, &client_cert, &client_key])
        .unwrap_or_else(|e| panic!("the replica did not start over TLS: {e}"));
    let agent = support::key(&replica.addr, "tls-admin-key-0123456789", "acme", "agent", &["submitter"]);
    let body = serde_json::json!({"topic": "infra.vm.create", "env": "dev"});
    assert_eq!(support::post(&replica.addr, "/api/v1/jobs", &agent, body).0, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while schema.count("SELECT COUNT(*) FROM outbox") != 0 {
        assert!(Instant::now() < deadline, "the relay never published over TLS");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(replica);

    // A CA that did not sign the server's certificate: the replica stops and says why.
    let other_ca = Ca::new().write(&support::temp_dir("tls-bus-other"));
    let refused = bus_replica(&schema.url(), &nats, &stream, &[&other_ca, &client_cert, &client_key]);
    let error = refused.err().expect("a server certificate of another CA was trusted");
    assert!(error.contains(&format!("cannot connect to tls://{nats}")), "{error}");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    eprintln!("wrong CA: {error}");
    // The right CA without a client certificate: the server refuses the replica.
    let refused = bus_replica(&schema.url(), &nats, &stream, &[&ca_file]);
    let error = refused.err().expect("a replica without a client certificate was let in");
    assert!(error.contains(&format!("cannot connect to tls://{nats}")), "{error}");
}

const SAFETY_TOKEN: &str = "tls-safety-token-0123456789";
const SAFETY_ADMIN: &str = "tls-admin-key-0123456789";

/// `airlock serve ARGS` with the safety token and admin key; its process and address.
fn safety_process(args: &[&str]) -> (support::Process, String) {
    let env = [("AIRLOCK_ADMIN_KEY", SAFETY_ADMIN), ("AIRLOCK_SAFETY_TOKEN", SAFETY_TOKEN)];
    let (process, addr, _) = support::airlock_printing(args, &env);
    (process, addr)
}

#[test]
fn the_safety_service_over_mutual_tls_and_a_wrong_certificate_is_unavailable() {
    let dir = support::temp_dir("tls-safety");
    let store = dir.join("store");
    let store = store.to_str().unwrap();
    let ca = Ca::new();
    let ca_file = ca.write(&dir);
    let file = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (cert, key) = ca.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (server_cert, server_key) = (file("safety.pem", cert), file("safety.key", key));
    let (cert, key) = ca.leaf(&["gateway"], ExtendedKeyUsagePurpose::ClientAuth);
    let (client_cert, client_key) = (file("gateway.pem", cert), file("gateway.key", key));
    let other_ca = Ca::new().write(&support::temp_dir("tls-safety-other"));
    let (ca_file, other_ca) = (ca_file.to_str().unwrap(), other_ca.to_str().unwrap());

    // The service serves HTTPS and answers only callers holding a certificate its CA signed.
    let (_safety, safety) = safety_process(&[
        "serve",
        "--role",
        "safety",
        "--listen",
        "127.0.0.1:0",
        "--data",
        store,
        "--tls-cert",
        &server_cert,
        "--tls-key",
        &server_key,
        "--tls-client-ca",
        ca_file,
    ]);
    let url = format!("https://{safety}");
    let gateway = |trust: &[&str], config: &str| {
        let path = file(&format!("config-{}.yaml", trust.len()), config.to_owned());
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data", store, "--config", &path];
        args.extend(["--safety-url", &url]);
        args.extend_from_slice(trust);
        safety_process(&args)
    };
    let deny = serde_json::json!({"topic": "infra.security_group.update", "env": "production",
        "payload": {"cidr": "0.0.0.0/0"}});
    let allow = serde_json::json!({"topic": "infra.vm.create", "env": "dev"});

    // With the CA and a client certificate, the remote decisions arrive over mutual TLS.
    let (_good, good) = gateway(
        &["--safety-ca", ca_file, "--safety-cert", &client_cert, "--safety-key", &client_key],
        "{}\n",
    );
    let agent = support::key(&good, SAFETY_ADMIN, "acme", "agent", &["submitter"]);
    let operator = support::key(&good, SAFETY_ADMIN, "acme", "operator", &["operator"]);
    let (status, reply) = support::post(&good, "/api/v1/jobs", &agent, &deny);
    assert_eq!((status, reply["rule_ids"][0].as_str()), (403, Some("deny-prod-public-ingress")), "{reply}");
    assert_eq!(support::post(&good, "/api/v1/jobs", &agent, &allow).0, 202);

    // A gateway that trusts another CA meets a certificate it cannot verify: the service is
    // unavailable, Gate A fails closed, and the failure is counted and audited.
    let (_wrong, wrong) = gateway(
        &["--safety-ca", other_ca, "--safety-cert", &client_cert, "--safety-key", &client_key],
        "{}\n",
    );
    let (status, reply) = support::post(&wrong, "/api/v1/jobs", &agent, &allow);
    assert_eq!((status, reply["error"].as_str()), (503, Some("safety_unavailable")), "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("invalid peer certificate"), "{reply}");
    let failures = "airlock_safety_check_failures_total{gate=\"a\",reason=\"unavailable\"}";
    assert_eq!(support::metric(&wrong, failures), 1.0);
    let (_, audit) = support::get(&wrong, "/api/v1/audit?limit=500", &operator);
    let refused: Vec<&serde_json::Value> =
        audit["records"].as_array().unwrap().iter().filter(|r| r["kind"] == "gate_a.unavailable").collect();
    assert_eq!(refused.len(), 1, "{audit}");
    assert!(refused[0]["data"]["error"].as_str().unwrap().contains("certificate"), "{audit}");

    // Without a client certificate the service refuses the caller: unavailable too. Where the
    // fail mode is open the job is admitted as bypassed, never as decided; elsewhere it stays
    // closed, so the job the policy denies is not admitted.
    let (_anonymous, anonymous) =
        gateway(&["--safety-ca", ca_file], "gate_a: { fail_mode_topics: { \"infra.vm.*\": open } }\n");
    let (status, reply) = support::post(&anonymous, "/api/v1/jobs", &agent, &allow);
    assert_eq!((status, reply["gate_a_bypassed"].as_bool()), (202, Some(true)), "{reply}");
    let (status, reply) = support::post(&anonymous, "/api/v1/jobs", &agent, &deny);
    assert_eq!((status, reply["error"].as_str()), (503, Some("safety_unavailable")), "{reply}");
    assert_eq!(support::metric(&anonymous, failures), 2.0);
}

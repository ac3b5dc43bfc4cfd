//! `mcp-tunnel doctor` against setups broken on purpose, each asserting the reason and the
//! fix, and against healthy ones (an in-process setup with the demo's MCP server, and the real
//! `run` with the cloudflared stand-in). All offline: every address is loopback, and checks
//! that would leave the machine are skipped (`--offline`).

mod common;
mod fake_tunnels_api;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use mcp_tunnel::certs::issue::{self, IssuedPair, KeyType};
use mcp_tunnel::doctor::{self, Check, Env, Options, Report, Verdict};
use mcp_tunnel::lifecycle::Shutdown;
use mcp_tunnel::proxy::upstream::{BoxFuture, Resolve};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
#[path = "common/standin.rs"]
mod standin_bin;
const LOOPBACK: &str = "allowed_ips = [\"127.0.0.0/8\"]";

fn options(pki: &TestPki) -> Options {
    Options {
        offline: true,
        timeout: Duration::from_secs(10),
        ..Options::new(pki.path("mcp-tunnel.toml"))
    }
}

/// Writes the config and runs every check.
async fn doctor_with(pki: &TestPki, text: &str, env: Env) -> Report {
    std::fs::write(pki.path("mcp-tunnel.toml"), text).unwrap();
    let report = doctor::run(&options(pki), &env).await;
    eprintln!("{}", report.text());
    report
}

async fn doctor(pki: &TestPki, text: &str) -> Report {
    doctor_with(pki, text, Env::system()).await
}

fn check<'a>(r: &'a Report, name: &str) -> &'a Check {
    r.get(name)
        .unwrap_or_else(|| panic!("no check {name} in\n{}", r.text()))
}

/// Asserts the verdict, and that the reason and the fix contain the given texts.
fn expect(r: &Report, name: &str, verdict: Verdict, reason: &[&str], fix: &[&str]) {
    let c = check(r, name);
    assert_eq!(c.verdict, verdict, "{name}: {c:?}");
    for want in reason {
        assert!(
            c.reason.contains(want),
            "{name} reason lacks {want:?}: {}",
            c.reason
        );
    }
    let f = c.fix.as_deref().unwrap_or("");
    for want in fix {
        assert!(f.contains(want), "{name} fix lacks {want:?}: {f}");
    }
    if verdict != Verdict::Ok && verdict != Verdict::Skip {
        assert!(c.fix.is_some(), "{name}: a {verdict:?} without a fix");
    }
}

/// The demo's sample MCP server (rmcp, tool `hello`) on an ephemeral loopback port.
async fn mcp_server() -> (SocketAddr, Shutdown) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sd = Shutdown::new();
    tokio::spawn(mcp_tunnel::demo::serve_sample(l, sd.clone()));
    (addr, sd)
}

fn write_server(pki: &TestPki, pair: &IssuedPair) {
    std::fs::write(pki.path("tls.crt"), &pair.cert_pem).unwrap();
    std::fs::write(pki.path("tls.key"), &pair.key_pem).unwrap();
    std::fs::set_permissions(pki.path("tls.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn now() -> i64 {
    mcp_tunnel::supervisor::reload::unix_now()
}

fn assert_healthy(r: &Report) {
    for c in &r.checks {
        assert!(
            matches!(c.verdict, Verdict::Ok | Verdict::Skip),
            "healthy setup, but {} is {:?}: {}\n{}",
            c.name,
            c.verdict,
            c.reason,
            r.text()
        );
    }
    assert!(!r.failed());
}

#[tokio::test]
async fn healthy_setup_is_all_ok_and_the_probe_reports_the_server() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    assert_healthy(&r);
    let mcp = check(&r, "route.echo.mcp");
    assert_eq!(mcp.facts["server_name"], "rmcp", "{mcp:?}");
    assert_eq!(mcp.facts["status"], 200);
    assert!(
        mcp.facts["protocol_version"]
            .as_str()
            .unwrap()
            .starts_with("20")
    );
    assert!(mcp.facts["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(
        mcp.facts["via"].as_str().unwrap().contains("in-process"),
        "no service runs: the probe goes through an in-process proxy: {mcp:?}"
    );
    for name in [
        "config",
        "config.secrets",
        "config.tunnel_domain",
        "certificate.pair",
        "certificate.validity",
        "certificate.names",
        "certificate.eku",
        "certificate.chain",
        "ca.upload_rules",
        "route.echo.dns",
        "route.echo.allowlist",
        "route.echo.connect",
    ] {
        assert_eq!(check(&r, name).verdict, Verdict::Ok, "{name}");
    }
    assert_eq!(
        check(&r, "route.echo.allowlist").facts["verdicts"][0]["rule"],
        "inside 127.0.0.0/8"
    );
    // A plain route leaves no audit trail, and doctor says so (issue 24).
    let audit = check(&r, "routes.audit");
    assert_eq!(audit.facts["not_audited"], serde_json::json!(["echo"]));
    assert!(
        audit.reason.contains("1 of 1 routes not audited")
            && audit.reason.contains("inspect = true"),
        "{}",
        audit.reason
    );
    // The JSON rendering carries the same checks.
    let json = r.json();
    assert_eq!(json["ok"], true);
    assert_eq!(json["checks"].as_array().unwrap().len(), r.checks.len());
}

#[tokio::test]
async fn wrong_san_names_the_uncovered_routes() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let other = issue::issue_server(&pki.ca(), "other.test", issue::SERVER_VALIDITY).unwrap();
    write_server(&pki, &other);
    let routes = format!("echo = \"http://{up}\"\nwiki = \"http://{up}\"");
    let r = doctor(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;
    expect(
        &r,
        "certificate.names",
        Verdict::Fail,
        &[
            "does not cover echo.tunnel.test (routes.echo), wiki.tunnel.test (routes.wiki)",
            "*.other.test",
        ],
        &[
            "issue the server certificate for tunnel.test and *.tunnel.test",
            "renew-cert --dir",
        ],
    );
    // What the edge would see: the handshake for the route's name fails.
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &["inner TLS handshake failed"],
        &["certificate.names"],
    );
    assert_eq!(check(&r, "certificate.chain").verdict, Verdict::Ok);
    assert!(r.failed());
    // The fix is a command: run it, and the names (and the handshakes) pass.
    run_fix(check(&r, "certificate.names")).await;
    let r = doctor(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;
    assert_healthy(&r);
}

/// Runs the command quoted in a check's fix (between backticks), with this build's binary.
async fn run_fix(c: &Check) {
    let fix = c.fix.as_deref().unwrap();
    let cmd = fix
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no command in {fix}"))
        .replace("mcp-tunnel ", &format!("{BIN} "));
    let out = tokio::process::Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{cmd}: {out:?}");
}

#[tokio::test]
async fn expired_certificate_is_refused_with_the_renewal_command() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let old = issue::issue_server_at(
        &pki.ca(),
        DOMAIN,
        Duration::from_secs(86400),
        KeyType::default(),
        now() - 10 * 86400,
    )
    .unwrap();
    write_server(&pki, &old);
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    expect(
        &r,
        "certificate.validity",
        Verdict::Fail,
        &["certificate expired at", "bad certificate"],
        &[&format!(
            "mcp-tunnel renew-cert --dir {}",
            pki.dir.path().display()
        )],
    );
    assert_eq!(check(&r, "certificate.validity").facts["days_left"], -9);
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &["inner TLS handshake failed"],
        &["certificate.validity"],
    );
    run_fix(check(&r, "certificate.validity")).await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    assert_healthy(&r);
}

#[tokio::test]
async fn certificate_from_a_foreign_ca_fails_the_chain_and_the_handshake() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let foreign = issue::generate(DOMAIN, issue::CA_VALIDITY, issue::SERVER_VALIDITY).unwrap();
    write_server(&pki, &foreign.server);
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    expect(
        &r,
        "certificate.chain",
        Verdict::Fail,
        &[
            "not signed by the configured CA",
            "unknown certificate authority",
        ],
        &[&format!("from the CA in {}", pki.path("ca.crt").display())],
    );
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &["inner TLS handshake failed"],
        &["not signed by the tunnel CA", "certificate.chain"],
    );
    // The names and validity are fine: only the chain is wrong.
    assert_eq!(check(&r, "certificate.names").verdict, Verdict::Ok);
    assert_eq!(check(&r, "certificate.validity").verdict, Verdict::Ok);
}

#[tokio::test]
async fn public_and_metadata_addresses_are_refused_with_the_rule_and_never_dialled() {
    let pki = TestPki::new();
    let routes = "public = \"http://8.8.8.8:80\"\nmeta = \"http://169.254.169.254:80\"";
    // The RFC 1918 default.
    let r = doctor(&pki, &config_text(&pki, "", routes, "")).await;
    expect(
        &r,
        "route.public.allowlist",
        Verdict::Fail,
        &[
            "IP validation failed: 8.8.8.8 is not a private address",
            "outside the default allowlist (RFC 1918",
            "never dials",
        ],
        &[
            "upstream.allowed_ips = [\"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"8.8.8.8/32\"]",
            "replaces the RFC 1918 default",
        ],
    );
    assert!(
        r.get("route.public.connect").is_none(),
        "a refused address is never dialled"
    );
    expect(&r, "route.public.mcp", Verdict::Skip, &["not probed"], &[]);
    // A catch-all allowlist still refuses the cloud metadata address, naming the rule.
    let r = doctor(
        &pki,
        &config_text(&pki, "", routes, "allowed_ips = [\"0.0.0.0/0\"]"),
    )
    .await;
    expect(
        &r,
        "route.meta.allowlist",
        Verdict::Fail,
        &[
            "169.254.169.254 is not a private address",
            "in 169.254.0.0/16, never a legitimate upstream",
        ],
        &["\"169.254.169.254/32\" (an entry inside 169.254.0.0/16)"],
    );
}

/// A name whose DNS answer mixes a private and a public address fails closed, and every
/// address gets its own verdict.
#[tokio::test]
async fn mixed_dns_answer_gets_a_verdict_per_address() {
    struct Mixed;
    impl Resolve for Mixed {
        fn resolve(&self, host: &str, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
            assert_eq!(host, "mcp.internal");
            Box::pin(async move {
                Ok(vec![
                    SocketAddr::from(([10, 0, 3, 7], port)),
                    SocketAddr::from(([203, 0, 113, 9], port)),
                ])
            })
        }
    }
    let pki = TestPki::new();
    let env = Env {
        resolver: Arc::new(Mixed),
        ..Env::system()
    };
    let r = doctor_with(
        &pki,
        &config_text(&pki, "", "m = \"http://mcp.internal:9000\"", ""),
        env,
    )
    .await;
    expect(
        &r,
        "route.m.dns",
        Verdict::Ok,
        &["mcp.internal -> 10.0.3.7, 203.0.113.9"],
        &[],
    );
    let c = check(&r, "route.m.allowlist");
    expect(
        &r,
        "route.m.allowlist",
        Verdict::Fail,
        &["203.0.113.9 is not a private address"],
        &["203.0.113.9/32"],
    );
    assert_eq!(
        c.facts["verdicts"],
        serde_json::json!([
            {"ip": "10.0.3.7", "allowed": true, "rule": "inside 10.0.0.0/8"},
            {"ip": "203.0.113.9", "allowed": false, "rule": "outside the default allowlist (RFC 1918: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"},
        ])
    );
}

#[tokio::test]
async fn refused_port_names_the_dial_error_and_what_to_start() {
    let pki = TestPki::new();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{closed}\""), LOOPBACK),
    )
    .await;
    expect(
        &r,
        "route.echo.connect",
        Verdict::Fail,
        &[
            &format!("dial tcp {closed}"),
            "Connection refused",
            "502 Upstream connection failed",
        ],
        &[&format!("start the MCP server on {closed}"), "routes.echo"],
    );
    expect(&r, "route.echo.mcp", Verdict::Skip, &["not probed"], &[]);
}

/// An upstream with DNS-rebinding protection: 421 unless `Host` is its own address.
async fn rebinding_protected() -> SocketAddr {
    let own = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let o = own.clone();
    let addr = upstream(move |req: Request<Incoming>| {
        let own = o.clone();
        async move {
            let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
            if Some(host) != own.get().map(String::as_str) {
                return Response::builder().status(421).body(full("Invalid Host header")).unwrap();
            }
            Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"guarded","version":"1.0"}}}"#,
                ))
                .unwrap()
        }
    })
    .await;
    own.set(addr.to_string()).unwrap();
    addr
}

#[tokio::test]
async fn upstream_421_is_explained_with_preserve_host() {
    let pki = TestPki::new();
    let up = rebinding_protected().await;
    let routes = format!("echo = {{ upstream = \"http://{up}\", preserve_host = true }}");
    let r = doctor(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &[
            "421 Misdirected Request from the upstream",
            "Host: echo.tunnel.test",
            "DNS-rebinding",
        ],
        &[
            "remove preserve_host = true from routes.echo",
            &format!("({up})"),
        ],
    );
    // The default (the proxy rewrites Host to the upstream's own) passes.
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    assert_eq!(
        check(&r, "route.echo.mcp").verdict,
        Verdict::Ok,
        "{}",
        r.text()
    );
    assert_eq!(check(&r, "route.echo.mcp").facts["server_name"], "guarded");
}

/// An OAuth upstream: 401 with a challenge naming its resource metadata, served at the
/// well-known path.
async fn oauth_upstream(metadata_url: String) -> SocketAddr {
    upstream(move |req: Request<Incoming>| {
        let meta = metadata_url.clone();
        async move {
            if req.uri().path() == "/.well-known/oauth-protected-resource" {
                return Response::builder()
                    .header("content-type", "application/json")
                    .body(full(
                        r#"{"resource":"https://echo.tunnel.test/mcp","authorization_servers":["https://auth.tunnel.test"]}"#,
                    ))
                    .unwrap();
            }
            Response::builder()
                .status(401)
                .header(
                    "www-authenticate",
                    format!("Bearer error=\"invalid_token\", resource_metadata=\"{meta}\""),
                )
                .body(full("unauthorized"))
                .unwrap()
        }
    })
    .await
}

#[tokio::test]
async fn oauth_upstream_announcing_an_internal_metadata_url_is_explained() {
    let pki = TestPki::new();
    let up = oauth_upstream("http://127.0.0.1:9/.well-known/oauth-protected-resource".into()).await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &[
            "401 (OAuth)",
            "http://127.0.0.1:9/.well-known/oauth-protected-resource",
            "not a tunnel hostname",
        ],
        &["public base URL as https://<route>.<tunnel domain>"],
    );
    assert_eq!(
        check(&r, "route.echo.mcp").facts["resource_metadata"],
        "http://127.0.0.1:9/.well-known/oauth-protected-resource"
    );
}

#[tokio::test]
async fn oauth_upstream_with_metadata_reachable_through_the_tunnel_is_ok() {
    let pki = TestPki::new();
    let up = oauth_upstream("https://echo.tunnel.test/.well-known/oauth-protected-resource".into())
        .await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Ok,
        &[
            "401 (OAuth upstream",
            "reachable through the tunnel (200)",
            "https://auth.tunnel.test",
        ],
        &[],
    );
}

#[tokio::test]
async fn wrong_path_404_is_explained() {
    let pki = TestPki::new();
    let up = upstream(|req: Request<Incoming>| async move {
        let status = if req.uri().path() == "/v1/mcp" { 200 } else { 404 };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(
                r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"pathy","version":"2"}}}"#,
            ))
            .unwrap()
    })
    .await;
    let text = config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK);
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &["404 Not Found from the upstream", "no MCP endpoint at /mcp"],
        &["https://echo.tunnel.test/<path>", "--path"],
    );
    let r = doctor::run(
        &Options {
            mcp_path: "/v1/mcp".into(),
            ..options(&pki)
        },
        &Env::system(),
    )
    .await;
    assert_eq!(check(&r, "route.echo.mcp").facts["server_name"], "pathy");
}

#[tokio::test]
async fn loose_key_mode_is_refused_with_chmod() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let key = pki.path("tls.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK);
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "config.secrets",
        Verdict::Fail,
        &["tls.key_file", "mode 0644", "refuses to start"],
        &[&format!("chmod 600 {}", key.display())],
    );
    // Allowed on purpose: a warning, still with the fix.
    let r = doctor(
        &pki,
        &config_text(
            &pki,
            "allow_readable_secrets = true",
            &format!("echo = \"http://{up}\""),
            LOOPBACK,
        ),
    )
    .await;
    expect(
        &r,
        "config.secrets",
        Verdict::Warn,
        &["allowed by allow_readable_secrets"],
        &["chmod 600"],
    );
}

#[tokio::test]
async fn invalid_config_is_reported_per_field_and_stops() {
    let pki = TestPki::new();
    let r = doctor(
        &pki,
        "listen_addr = \"nope\"\n[routes]\necho = \"http://h:1/mcp\"\n",
    )
    .await;
    assert!(r.failed());
    let reasons: Vec<&str> = r.checks.iter().map(|c| c.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("listen_addr")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("routes.echo") && r.contains("has a path")),
        "{reasons:?}"
    );
    assert!(r.checks.iter().all(|c| c.name == "config"));
}

fn cloudflared_config(pki: &TestPki, up: SocketAddr, cloudflared: &str, extra: &str) -> String {
    format!(
        "listen_addr = \"127.0.0.1:0\"\ntunnel_domain = \"{DOMAIN}\"\n{extra}\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[routes]\necho = \"http://{up}\"\n[upstream]\n{LOOPBACK}\n[cloudflared]\n{cloudflared}\n",
        pki.path("tls.crt").display(),
        pki.path("tls.key").display(),
    )
}

fn write_token(path: &Path, mode: u32) {
    use base64::Engine;
    let t = base64::engine::general_purpose::STANDARD
        .encode(r#"{"a":"acct","t":"0c5f3c51-3c1b-4a9a-9a43-7e4f8b8e9a01","s":"c2VjcmV0"}"#);
    std::fs::write(path, t).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn missing_cloudflared_binary_and_token_problems() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let token = pki.path("tunnel-token");
    let text = cloudflared_config(
        &pki,
        up,
        &format!(
            "binary = \"/nonexistent/cloudflared\"\ntoken_file = \"{}\"",
            token.display()
        ),
        "[admin]\nenabled = false",
    );
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "cloudflared.binary",
        Verdict::Fail,
        &["/nonexistent/cloudflared: not found or not executable"],
        &[
            "install cloudflared",
            "[cloudflared] binary",
            "enabled = false",
        ],
    );
    assert!(r.get("cloudflared.version").is_none());
    expect(
        &r,
        "cloudflared.token",
        Verdict::Fail,
        &[&format!("{}: cannot read", token.display())],
        &["Console > Manage > MCP tunnels", "mode 0600", "setup init"],
    );
    expect(&r, "cloudflared.edge", Verdict::Skip, &["--offline"], &[]);

    write_token(&token, 0o644);
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "cloudflared.token",
        Verdict::Fail,
        &["mode 0644"],
        &[&format!("chmod 600 {}", token.display())],
    );
    std::fs::write(&token, "not-a-token").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "cloudflared.token",
        Verdict::Fail,
        &["not base64"],
        &["copy it again"],
    );
}

#[tokio::test]
async fn cloudflared_binary_version_and_flags_are_checked_by_running_it() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let token = pki.path("tunnel-token");
    write_token(&token, 0o600);
    let text = cloudflared_config(
        &pki,
        up,
        &format!(
            "binary = \"{}\"\ntoken_file = \"{}\"",
            standin_bin::path(),
            token.display()
        ),
        "[admin]\nenabled = false",
    );
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "cloudflared.binary",
        Verdict::Ok,
        &[standin_bin::path()],
        &[],
    );
    expect(
        &r,
        "cloudflared.version",
        Verdict::Ok,
        &["cloudflared version 2000.1.0-standin"],
        &[],
    );
    assert_eq!(
        check(&r, "cloudflared.version").facts["version"],
        "2000.1.0-standin"
    );
    expect(
        &r,
        "cloudflared.flags",
        Verdict::Ok,
        &["tunnel --no-autoupdate", "run --url http://127.0.0.1:0"],
        &[],
    );
    expect(
        &r,
        "cloudflared.token",
        Verdict::Ok,
        &[
            "names tunnel 0c5f3c51-3c1b-4a9a-9a43-7e4f8b8e9a01",
            "mode 0600",
        ],
        &[],
    );

    // A binary that refuses a flag `run` passes, the way cloudflared does (usage on stdout,
    // exit 0).
    let old = pki.path("old-cloudflared");
    std::fs::write(
        &old,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'cloudflared version 2020.1.0 (built x)'; exit 0; }\nfor a in \"$@\"; do [ \"$a\" = --grace-period ] && { echo 'Incorrect Usage: flag provided but not defined: -grace-period'; exit 0; }; done\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = cloudflared_config(
        &pki,
        up,
        &format!(
            "binary = \"{}\"\ntoken_file = \"{}\"",
            old.display(),
            token.display()
        ),
        "[admin]\nenabled = false",
    );
    let r = doctor(&pki, &text).await;
    expect(
        &r,
        "cloudflared.flags",
        Verdict::Fail,
        &["Incorrect Usage: flag provided but not defined: -grace-period"],
        &["install a current cloudflared"],
    );
}

/// Waits for `/status` to say ready with all four edge connections.
async fn wait_ready(admin: SocketAddr, log: &Path) {
    for _ in 0..200 {
        if let Ok((200, body)) = mcp_tunnel::telemetry::status::get(admin, "/status").await
            && serde_json::from_str::<serde_json::Value>(&body).unwrap()["cloudflared"]["connections"]
                == 4
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "not ready; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The real `run` (listener, admin endpoint, cloudflared stand-in): the probe goes through the
/// running listener, the connector and the service's components are read from `/status`, and
/// a refused reload shows up.
#[tokio::test]
async fn running_service_is_inspected_through_its_admin_endpoint() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    let token = pki.path("tunnel-token");
    write_token(&token, 0o600);
    // The service listens on port 0 (listener and admin endpoint) from a config in a folder of
    // its own; doctor's copy names the addresses the service logged.
    let run_text = cloudflared_config(
        &pki,
        up,
        &format!(
            "binary = \"{}\"\ntoken_file = \"{}\"\nhealth_interval = \"100ms\"",
            standin_bin::path(),
            token.display()
        ),
        "[admin]\nlisten_addr = \"127.0.0.1:0\"",
    );
    let config = pki.dir.path().join("run").join("mcp-tunnel.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, &run_text).unwrap();
    let log = pki.path("run.log");
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("WATCHDOG_USEC", "4000000")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin = logged_addr(&log, "admin endpoint listening", "listen").await;
    let listen = logged_addr(&log, "proxy listening", "listen").await;
    wait_ready(admin, &log).await;
    let text = run_text
        .replacen(
            "listen_addr = \"127.0.0.1:0\"",
            &format!("listen_addr = \"{listen}\""),
            1,
        )
        .replace(
            "[admin]\nlisten_addr = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten_addr = \"{admin}\""),
        );
    assert!(!text.contains(":0\""), "{text}");

    let r = doctor(&pki, &text).await;
    assert_healthy(&r);
    let mcp = check(&r, "route.echo.mcp");
    assert!(
        mcp.facts["via"]
            .as_str()
            .unwrap()
            .contains(&format!("running listener ws://{listen}")),
        "{mcp:?}"
    );
    for name in [
        "service.admin",
        "service.listener",
        "service.certificate",
        "service.cloudflared",
        "service.supervisor",
        "service.config",
        "service.watchdog",
    ] {
        assert_eq!(check(&r, name).verdict, Verdict::Ok, "{name}");
    }
    expect(
        &r,
        "service.watchdog",
        Verdict::Ok,
        &["WatchdogSec=4s"],
        &[],
    );
    let c = check(&r, "cloudflared.connector");
    assert!(
        c.reason.starts_with("connected: 4/4 edge connections"),
        "{c:?}"
    );
    assert_eq!(c.facts["version"], "2000.1.0-standin");
    assert!(
        c.facts["connector_id"]
            .as_str()
            .unwrap()
            .ends_with("-0000-4000-8000-00000000002a"),
        "{c:?}"
    );

    // `status` shows the same facts.
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .await
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("cloudflared 2000.1.0-standin, connector "),
        "{status}"
    );
    assert!(status.contains("4/4 connections"), "{status}");
    assert!(
        status.contains("certificate expires in 89 days")
            || status.contains("certificate expires in 90 days"),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["echo", "1", "0"]),
        "per-route counts: {status}"
    );
    assert!(
        !status.split_whitespace().any(|w| w.starts_with("-0")),
        "{status}"
    );

    // A broken edit: doctor reports the file, and the service's refusal of it.
    std::fs::write(
        &config,
        run_text.replace("[routes]", "[routes]\nbad = \"http://h:1/mcp\""),
    )
    .unwrap();
    std::fs::write(
        pki.path("mcp-tunnel.toml"),
        text.replace("[routes]", "[routes]\nbad = \"http://h:1/mcp\""),
    )
    .unwrap();
    let r = doctor::run(&options(&pki), &Env::system()).await;
    expect(
        &r,
        "config",
        Verdict::Fail,
        &["routes.bad", "has a path"],
        &["mcp-tunnel check --config"],
    );
    // The service keeps the last good config; seen through a copy of it.
    let good = pki.dir.path().join("good").join("mcp-tunnel.toml");
    std::fs::create_dir_all(good.parent().unwrap()).unwrap();
    std::fs::write(&good, &text).unwrap();
    let mut seen = None;
    for _ in 0..100 {
        let r = doctor::run(
            &Options {
                config: good.clone(),
                ..options(&pki)
            },
            &Env::system(),
        )
        .await;
        if r.get("service.config")
            .is_some_and(|c| c.verdict == Verdict::Warn)
        {
            seen = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = seen.expect("service.config reports the refused reload");
    expect(
        &r,
        "service.config",
        Verdict::Warn,
        &["the last reload was refused", "routes.bad"],
        &["mcp-tunnel check --config"],
    );
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// The binary: exit status, text and `--json`.
#[tokio::test]
async fn binary_exit_status_and_json() {
    let pki = TestPki::new();
    let (up, _sd) = mcp_server().await;
    std::fs::write(
        pki.path("mcp-tunnel.toml"),
        config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .unwrap();
    let run = |args: Vec<String>| async move {
        tokio::process::Command::new(BIN)
            .args(args)
            .output()
            .await
            .unwrap()
    };
    let cfg = pki.path("mcp-tunnel.toml").display().to_string();
    let out = run(vec![
        "doctor".into(),
        "--config".into(),
        cfg.clone(),
        "--offline".into(),
        "--json".into(),
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ok"], true);
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "route.echo.mcp" && c["verdict"] == "ok")
    );
    std::fs::set_permissions(pki.path("tls.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(vec![
        "doctor".into(),
        "--config".into(),
        cfg.clone(),
        "--offline".into(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  config.secrets"), "{text}");
    assert!(text.contains("fix: chmod 600"), "{text}");

    let out = run(vec![
        "explain".into(),
        "https://echo.tunnel.test/mcp".into(),
        "--config".into(),
        cfg.clone(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("route        echo (subdomain match)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("upstream     http://{up}/mcp with Host: {up}")),
        "{text}"
    );
    assert!(
        text.contains("127.0.0.1 allowed (inside 127.0.0.0/8)"),
        "{text}"
    );
    assert!(
        text.contains("SAN *.tunnel.test covers echo.tunnel.test"),
        "{text}"
    );
    let out = run(vec![
        "explain".into(),
        "https://ecoh.tunnel.test/mcp".into(),
        "--config".into(),
        cfg,
        "--json".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["route"]["rule"], "none");
    assert_eq!(json["route"]["near_misses"][0], "echo (echo.tunnel.test)");
    assert_eq!(
        json["outcome"],
        "502 No route configured for host (log: no route for host)"
    );
}

/// With `[provision]`: the state directory's CA is looked up among the tunnel's active
/// certificates (the local Tunnels API), and `--offline` skips the call.
#[tokio::test]
async fn provisioned_ca_must_be_registered_on_the_tunnel() {
    let fake = fake_tunnels_api::Fake::start().await;
    let tunnel = fake.with(|s| {
        s.api_keys.insert("sk-ant-doctor-test".into());
        s.create_tunnel()
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pki = issue::generate(&tunnel.domain, issue::CA_VALIDITY, issue::SERVER_VALIDITY).unwrap();
    pki.write_to_with_domain(&state, &tunnel.domain).unwrap();
    std::fs::write(state.join("tunnel-id"), &tunnel.id).unwrap();
    write_token(&state.join("tunnel-token"), 0o600);
    std::fs::write(dir.path().join("api-key"), "sk-ant-doctor-test").unwrap();
    let (up, _sd) = mcp_server().await;
    let config = dir.path().join("mcp-tunnel.toml");
    std::fs::write(
        &config,
        format!(
            "listen_addr = \"127.0.0.1:0\"\n[routes]\necho = \"http://{up}\"\n[upstream]\n{LOOPBACK}\n[admin]\nenabled = false\n[cloudflared]\nenabled = false\n[provision]\napi_url = \"{}\"\nstate_dir = \"state\"\napi_token_file = \"api-key\"\n",
            fake.url
        ),
    )
    .unwrap();
    let opts = Options {
        offline: false,
        timeout: Duration::from_secs(10),
        ..Options::new(&config)
    };
    // Credentials from the config only, whatever this process's environment holds.
    let env = Env {
        var: Arc::new(|_| None),
        ..Env::system()
    };
    let r = doctor::run(&opts, &env).await;
    eprintln!("{}", r.text());
    expect(
        &r,
        "ca.registered",
        Verdict::Fail,
        &[
            &format!(
                "is not among the 0 active certificates of tunnel {}",
                tunnel.id
            ),
            "unknown certificate authority",
        ],
        &["restart the service", "setup init", "Add certificate"],
    );
    assert_eq!(check(&r, "route.echo.mcp").verdict, Verdict::Ok);
    fake.with(|s| s.register(&tunnel.id, &pki.ca.cert_pem))
        .unwrap();
    let r = doctor::run(&opts, &Env::system()).await;
    expect(
        &r,
        "ca.registered",
        Verdict::Ok,
        &[&format!(
            "is registered and active on tunnel {} (1 active certificate)",
            tunnel.id
        )],
        &[],
    );
    assert_healthy(&r);
    let r = doctor::run(
        &Options {
            offline: true,
            ..opts
        },
        &Env::system(),
    )
    .await;
    expect(&r, "ca.registered", Verdict::Skip, &["--offline"], &[]);
}

/// `mcp-tunnel demo` as it runs, then `mcp-tunnel doctor` on the config it wrote: all ok.
#[tokio::test]
async fn the_demo_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let out = dir.path().join("demo.out");
    let mut demo = tokio::process::Command::new(BIN)
        .args(["demo", "--port", "0", "--dir"])
        .arg(&demo_dir)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("Press Ctrl-C")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = demo_dir.join("mcp-tunnel.toml");
    let output = tokio::process::Command::new(BIN)
        .arg("doctor")
        .arg("--config")
        .arg(&config)
        .args(["--offline", "--json"])
        .output()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(output.status.code(), Some(0), "{json:#}");
    for c in json["checks"].as_array().unwrap() {
        assert!(c["verdict"] == "ok" || c["verdict"] == "skip", "demo: {c}");
    }
    let mcp = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "route.hello.mcp")
        .unwrap();
    assert_eq!(mcp["verdict"], "ok");
    assert_eq!(mcp["facts"]["server_name"], "rmcp");
    demo.start_kill().unwrap();
    let _ = demo.wait().await;
}

/// An https upstream: the connect check runs the pool's connector (TCP + TLS against
/// upstream.tls); a certificate from another CA fails there with the fix. Its answer to
/// `initialize` is not MCP, which the probe says.
#[tokio::test]
async fn https_upstream_tls_is_checked_by_the_pools_connector() {
    let pki = TestPki::new();
    let up_dir = tempfile::tempdir().unwrap();
    issue::generate(
        "localhost",
        Duration::from_secs(86400),
        Duration::from_secs(86400),
    )
    .unwrap()
    .write_to(up_dir.path())
    .unwrap();
    let pair = mcp_tunnel::certs::load_server_pair(&mcp_tunnel::config::TlsFiles {
        cert_file: up_dir.path().join("tls.crt"),
        key_file: up_dir.path().join("tls.key"),
    })
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(mcp_tunnel::proxy::tls::server_config(
        Arc::new(mcp_tunnel::proxy::tls::CertStore::new(pair)),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(full("secure hello")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let routes = format!("sec = \"https://localhost:{port}\"");
    let trust = |ca: &Path| {
        format!(
            "allowed_ips = [\"127.0.0.0/8\", \"::1\"]\n[upstream.tls]\nca_file = \"{}\"",
            ca.display()
        )
    };
    let r = doctor(
        &pki,
        &config_text(&pki, "", &routes, &trust(&up_dir.path().join("ca.crt"))),
    )
    .await;
    expect(
        &r,
        "route.sec.connect",
        Verdict::Ok,
        &["TCP + TLS to "],
        &[],
    );
    expect(
        &r,
        "route.sec.mcp",
        Verdict::Fail,
        &[
            "200",
            "no JSON-RPC answer to `initialize`: not an MCP endpoint",
        ],
        &["MCP endpoint"],
    );
    let r = doctor(
        &pki,
        &config_text(&pki, "", &routes, &trust(&pki.path("ca.crt"))),
    )
    .await;
    expect(
        &r,
        "route.sec.connect",
        Verdict::Fail,
        &[
            "TLS with upstream localhost failed",
            "502 Upstream connection failed",
        ],
        &["valid for localhost and signed by a CA in upstream.tls.ca_file"],
    );
    expect(&r, "route.sec.mcp", Verdict::Skip, &["not probed"], &[]);
}

/// A server of MCP 2026-07-28 only: `server/discover` answered, `initialize` refused (as the
/// revision lets such a server do), and the request headers the revision requires checked.
async fn modern_only_server(versions: &'static str) -> SocketAddr {
    upstream(move |req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let headers = req.headers().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let json = |status: u16, v: serde_json::Value| {
            http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(full(v.to_string()))
                .unwrap()
        };
        let modern = headers.get("mcp-protocol-version").is_some_and(|h| h == "2026-07-28")
            && headers.get("mcp-method").is_some_and(|h| h == "server/discover")
            && v["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28";
        if v["method"] == "server/discover" && modern && versions.contains("2026-07-28") {
            return json(200, serde_json::json!({"jsonrpc": "2.0", "id": v["id"], "result": {
                "resultType": "complete", "supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}},
                "ttlMs": 0, "cacheScope": "public",
                "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "stateless", "version": "2.0"}}}}));
        }
        if v["method"] == "server/discover" {
            return json(400, serde_json::json!({"jsonrpc": "2.0", "id": v["id"], "error": {
                "code": -32022, "message": "Unsupported protocol version",
                "data": {"supported": [versions], "requested": "2026-07-28"}}}));
        }
        json(400, serde_json::json!({"jsonrpc": "2.0", "id": v["id"], "error": {
            "code": -32022, "message": "initialize is not served", "data": {"supported": ["2026-07-28"]}}}))
    })
    .await
}

#[tokio::test]
async fn a_stateless_server_is_probed_with_server_discover_and_its_revision_named() {
    let pki = TestPki::new();
    let up = modern_only_server("2026-07-28").await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    assert_healthy(&r);
    let mcp = check(&r, "route.echo.mcp");
    assert_eq!(mcp.facts["protocol_version"], "2026-07-28", "{mcp:?}");
    assert_eq!(mcp.facts["server_name"], "stateless");
    assert!(
        mcp.reason
            .contains("MCP protocol 2026-07-28 (server/discover"),
        "{}",
        mcp.reason
    );

    // A server of a later revision only: it answers -32022 with what it supports, and doctor
    // says so instead of calling the endpoint broken or not MCP.
    let up = modern_only_server("2027-03-01").await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    expect(
        &r,
        "route.echo.mcp",
        Verdict::Fail,
        &[
            "server/discover",
            "-32022",
            "the server supports [\"2027-03-01\"]",
        ],
        &["MCP server's log"],
    );

    // A server of the older revisions only, answering server/discover as the TypeScript SDK v1
    // does (400, not initialized): it is asked with initialize, and its revision named.
    let up = upstream(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let (status, answer) = if v["method"] == "initialize" {
            (
                200,
                serde_json::json!({"jsonrpc": "2.0", "id": v["id"], "result": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "serverInfo": {"name": "legacy", "version": "1.0"}}}),
            )
        } else {
            (
                400,
                serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {
                "code": -32000, "message": "Bad Request: Server not initialized"}}),
            )
        };
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(answer.to_string()))
            .unwrap()
    })
    .await;
    let r = doctor(
        &pki,
        &config_text(&pki, "", &format!("echo = \"http://{up}\""), LOOPBACK),
    )
    .await;
    let mcp = check(&r, "route.echo.mcp");
    assert_eq!(mcp.verdict, Verdict::Ok, "{mcp:?}");
    assert_eq!(mcp.facts["protocol_version"], "2025-06-18", "{mcp:?}");
    assert_eq!(mcp.facts["server_name"], "legacy", "{mcp:?}");
    assert!(!mcp.reason.contains("server/discover"), "{}", mcp.reason);
}

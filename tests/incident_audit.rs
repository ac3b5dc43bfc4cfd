//! `mcp-tunnel audit`: the review of a window, read from what the real service logged
//! (`log_format = "json"`, the journal's keys): requests per route, callers, MCP messages
//! with outcomes, refusals, and the notable events in time order.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");

/// The first JSON log line whose MESSAGE starts with `message`.
async fn wait_line(log: &std::path::Path, message: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(v) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| {
                v["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
        {
            return v;
        }
        assert!(Instant::now() < end, "no {message:?} line in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn audit(log: &std::path::Path, since: &str) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["audit", "--json", "--since", since, "--file"])
        .arg(log)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reviews_what_the_service_logged_in_the_window() {
    let pki = TestPki::new();
    let up = upstream(|req: http::Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let out = json!({"jsonrpc": "2.0", "id": v["id"], "result": {"content": []}});
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(out.to_string()))
            .unwrap()
    })
    .await;
    let routes = format!(
        "files = {{ upstream = \"http://{up}\", tools_deny = [\"rm\"] }}\nplain = \"http://{up}\""
    );
    let text = config_text(
        &pki,
        "log_format = \"json\"",
        &routes,
        "allowed_ips = [\"127.0.0.0/8\"]",
    );
    let config = pki.path("audit.toml");
    std::fs::write(&config, &text).unwrap();
    let log = pki.path("service.jsonl");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let listening = wait_line(&log, "proxy listening").await;
    let listen = listening["F_LISTEN"].as_str().unwrap().to_string();
    let started_us: u64 = listening["__REALTIME_TIMESTAMP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let target = mcp_tunnel::proxy::edge::WsTarget::parse(&format!("ws://{listen}")).unwrap();
    let send = |host: &'static str, req: http::Request<Body>| {
        let target = target.clone();
        let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"http/1.1".to_vec()]);
        async move {
            let stream = target.connect_tls(tls, host).await.unwrap();
            let (mut s, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let resp = s.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
    };
    let call = |tool: &str| {
        http::Request::post("/mcp")
            .header("host", "files.tunnel.test")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(full(
                json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
                    .to_string(),
            ))
            .unwrap()
    };
    assert_eq!(send("files.tunnel.test", call("echo")).await, 200);
    assert_eq!(
        send("files.tunnel.test", call("rm")).await,
        200,
        "the policy answers with a JSON-RPC error"
    );
    let get = |host: &str| {
        http::Request::get("/")
            .header("host", host)
            .body(full(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        send("plain.tunnel.test", get("plain.tunnel.test")).await,
        200
    );
    assert_eq!(
        send("nothing.tunnel.test", get("nothing.tunnel.test")).await,
        502
    );
    // A live change, then the stop: both are events of the window.
    std::fs::write(
        &config,
        text.replace("[routes]\n", "[routes]\nextra = \"http://127.0.0.1:9\"\n"),
    )
    .unwrap();
    wait_line(&log, "config reloaded").await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());

    let since = time::OffsetDateTime::from_unix_timestamp((started_us / 1_000_000) as i64 - 1)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (code, out, err) = audit(&log, &since);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["routes"]["files"], json!([2, 0]), "{out}");
    assert_eq!(r["routes"]["plain"], json!([1, 0]), "{out}");
    assert_eq!(r["callers"]["127.0.0.1"].as_u64().unwrap(), 3, "{out}");
    assert_eq!(r["mcp"]["files tools/call echo ok"], 1, "{out}");
    assert_eq!(r["mcp"]["files tools/call rm denied"], 1, "{out}");
    assert_eq!(r["refusals"]["mcp policy: tool_denied"], 1, "{out}");
    assert!(
        r["refusals"]["no route for the host"].as_u64().unwrap() >= 1,
        "{out}"
    );
    let events: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    let at = |needle: &str| {
        events
            .iter()
            .position(|m| m.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle:?} event in {events:#?}"))
    };
    assert!(at("proxy listening") < at("config reloaded"), "{events:#?}");
    assert!(at("config reloaded") < at("shutting down"), "{events:#?}");
    let times: Vec<u64> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["at"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "time order: {times:?}"
    );

    // A window with nothing in it says so, and fails.
    let (code, _, err) = audit(&log, "2100-01-01 00:00");
    assert_eq!(code, 1);
    assert!(
        err.contains("no entries of") && err.contains("since 2100-01-01 00:00"),
        "{err}"
    );
    // journalctl's relative form ("-30min") is a value, not a flag.
    let (code, _, err) = audit(&log, "-30min");
    assert_eq!(code, 2);
    assert!(
        err.contains("--since \"-30min\": expected an RFC 3339 time"),
        "{err}"
    );
    // A time it cannot read is named.
    let (code, _, err) = audit(&log, "yesterday");
    assert_eq!(code, 2);
    assert!(
        err.contains("--since \"yesterday\": expected an RFC 3339 time"),
        "{err}"
    );
}

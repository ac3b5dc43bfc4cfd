//! The MCP-aware boundary through the real listener (WebSocket + inner TLS + HTTP): audit
//! lines, metrics, tool policy on JSON and SSE answers, streaming kept, and hostile input.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use mcp_tunnel::config::Config;
use mcp_tunnel::supervisor::reload::{self, Reloader, unix_now};
use mcp_tunnel::telemetry::metrics::{AppState, render};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const LOOPBACK: &str = "allowed_ips = [\"127.0.0.0/8\"]";

// ----------------------------------------------------------------------------- log capture

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of this test binary into `LOGS` (before any proxy installs its own).
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_writer(|| Capture)
            .with_ansi(false)
            .try_init();
    });
}

/// The audit lines of one route so far.
fn audit_lines(route: &str) -> Vec<String> {
    let logs = LOGS.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains("mcp_audit:") && l.contains(&format!(" route={route} ")))
        .map(str::to_owned)
        .collect()
}

/// The value of `key` in a formatted log line (`key=value` or `key="value"`).
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if let Some(q) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        None
    } else {
        Some(rest.split(' ').next().unwrap_or("").to_owned())
    }
}

/// The audit line of the message with JSON-RPC id `id` (as logged, e.g. `7` or `"a"`).
async fn audit_line(route: &str, id: &str) -> String {
    for _ in 0..200 {
        if let Some(l) = audit_lines(route)
            .into_iter()
            .find(|l| field(l, "rpc_id").as_deref() == Some(id))
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "no audit line for id {id} on route {route}; lines: {:#?}",
        audit_lines(route)
    );
}

// ----------------------------------------------------------------------------- upstream

/// Bodies the upstream received, to prove what was (not) forwarded.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Vec<u8>>>>);

impl Seen {
    fn all(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }

    /// Tool names of every tools/call the upstream received.
    fn called_tools(&self) -> Vec<String> {
        let mut out = Vec::new();
        for body in self.all() {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                continue;
            };
            let msgs = match v {
                Value::Array(a) => a,
                one => vec![one],
            };
            for m in msgs {
                if m["method"] == "tools/call" {
                    out.push(m["params"]["name"].as_str().unwrap_or("?").to_owned());
                }
            }
        }
        out
    }
}

const KNOWN_TOOLS: [&str; 6] = ["echo", "get-env", "admin-reset", "add", "admin-x", "fail"];

fn tool(name: &str) -> Value {
    json!({"name": name, "description": format!("the {name} tool"), "inputSchema": {"type": "object"}})
}

fn answer(m: &Value) -> Option<Value> {
    let id = m.get("id")?.clone();
    let method = m["method"].as_str()?;
    let result = match method {
        "initialize" => {
            json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "test", "version": "0"}})
        }
        "tools/list" => match m["params"]["cursor"].as_str() {
            None => {
                json!({"tools": [tool("echo"), tool("get-env"), tool("admin-reset")], "nextCursor": "page-2"})
            }
            Some(_) => json!({"tools": [tool("add"), tool("admin-x"), tool("fail")]}),
        },
        "tools/call" => match m["params"]["name"].as_str() {
            Some("fail") => {
                json!({"content": [{"type": "text", "text": "it failed"}], "isError": true})
            }
            Some(n) if KNOWN_TOOLS.contains(&n) => {
                json!({"content": [{"type": "text", "text": format!("ran {n} with {}", m["params"]["arguments"])}]})
            }
            _ => {
                return Some(
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "Unknown tool"}}),
                );
            }
        },
        _ => json!({}),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// A small MCP server: POST `/mcp` answers as JSON, POST `/sse` as SSE (a progress
/// notification, then the answer); notifications get 202.
async fn mcp_server(seen: Seen) -> SocketAddr {
    upstream(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let sse = req.uri().path() == "/sse";
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.0.lock().unwrap().push(body.to_vec());
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return Response::builder()
                    .status(400)
                    .header("content-type", "application/json")
                    .body(full(
                        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#,
                    ))
                    .unwrap();
            };
            let answers: Vec<Value> = match &v {
                Value::Array(a) => a.iter().filter_map(answer).collect(),
                one => answer(one).into_iter().collect(),
            };
            if answers.is_empty() {
                return Response::builder().status(202).body(full("")).unwrap();
            }
            let out = if v.is_array() {
                Value::Array(answers)
            } else {
                answers.into_iter().next().unwrap()
            };
            let b = Response::builder().header("mcp-session-id", "sess-1");
            if sse {
                let text = format!(
                    "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progress\":1}}}}\n\n: keep-alive\n\nevent: message\nid: ev-1\ndata: {out}\n\n"
                );
                b.header("content-type", "text/event-stream")
                    .body(full(text))
                    .unwrap()
            } else {
                b.header("content-type", "application/json")
                    .body(full(out.to_string()))
                    .unwrap()
            }
        }
    })
    .await
}

// ----------------------------------------------------------------------------- client

fn post_req(host: &str, path: &str, body: Body, h2: bool) -> Request<Body> {
    let b = Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18");
    let b = if h2 {
        b.uri(format!("https://{host}{path}"))
    } else {
        b.uri(path).header("host", host)
    };
    b.body(body).unwrap()
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    /// The JSON-RPC messages in the body (JSON, or the data of each SSE event).
    fn messages(&self) -> Vec<Value> {
        let ct = self
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let texts: Vec<String> = if ct.starts_with("text/event-stream") {
            self.body
                .split("\n\n")
                .filter_map(|ev| {
                    let data: Vec<&str> = ev
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(str::trim_start)
                        .collect();
                    (!data.is_empty()).then(|| data.join("\n"))
                })
                .collect()
        } else if self.body.is_empty() {
            Vec::new()
        } else {
            vec![self.body.clone()]
        };
        texts
            .iter()
            .flat_map(|t| match serde_json::from_str::<Value>(t).unwrap() {
                Value::Array(a) => a,
                one => vec![one],
            })
            .collect()
    }

    fn response(&self, id: Value) -> Value {
        self.messages()
            .into_iter()
            .find(|m| m["id"] == id && m.get("method").is_none())
            .unwrap_or_else(|| panic!("no response with id {id} in {}", self.body))
    }
}

async fn send(edge: &mut Edge, req: Request<Body>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(20), edge.send(req))
        .await
        .expect("answer within 20 s");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn post(edge: &mut Edge, host: &str, path: &str, body: impl Into<String>) -> Answer {
    let h2 = matches!(edge, Edge::H2(_));
    send(edge, post_req(host, path, full(body.into()), h2)).await
}

fn call(id: u64, tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
        .to_string()
}

fn list(id: u64, cursor: Option<&str>) -> String {
    let params = match cursor {
        Some(c) => json!({"cursor": c}),
        None => json!({}),
    };
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/list", "params": params}).to_string()
}

fn tool_names(result: &Value) -> Vec<String> {
    result["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {result}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn metrics_text(p: &TestProxy) -> String {
    render(&AppState::new(p.proxy.metrics().clone(), false), 0)
}

/// The value of one sample line of the metrics text (0 when absent).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn start(pki: &TestPki, routes: &str, extra: &str) -> TestProxy {
    capture_logs();
    TestProxy::start(pki, &config_text(pki, extra, routes, LOOPBACK)).await
}

// ----------------------------------------------------------------------------- tests

#[tokio::test]
async fn audit_and_metrics_show_each_call_with_its_outcome() {
    let pki = TestPki::new();
    let seen = Seen::default();
    let up = mcp_server(seen.clone()).await;
    let routes = format!(
        "audited = {{ upstream = \"http://{up}\", inspect = true, log_argument_names = true }}\nplain = \"http://{up}\"\n"
    );
    let proxy = start(&pki, &routes, "").await;
    for h2 in [false, true] {
        let mut edge = Edge::connect(&proxy, &pki, "audited.tunnel.test", h2).await;
        let host = "audited.tunnel.test";
        let base = if h2 { 100 } else { 0 };
        let init = json!({"jsonrpc": "2.0", "id": base + 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
        let a = post(&mut edge, host, "/mcp", init.to_string()).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let a = post(
            &mut edge,
            host,
            "/mcp",
            call(base + 2, "echo", json!({"message": "secret-value-123"})),
        )
        .await;
        assert!(a.response(json!(base + 2))["result"].is_object());
        post(&mut edge, host, "/mcp", call(base + 3, "fail", json!({}))).await;
        post(&mut edge, host, "/mcp", call(base + 4, "nope", json!({}))).await;
        let a = post(
            &mut edge,
            host,
            "/mcp",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )
        .await;
        assert_eq!(a.status, 202);
        let a = post(&mut edge, host, "/sse", list(base + 5, None)).await;
        assert_eq!(
            tool_names(&a.response(json!(base + 5))),
            ["echo", "get-env", "admin-reset"],
            "without a policy nothing is hidden"
        );
        // The same calls on a route without inspection leave no audit line.
        let mut plain = Edge::connect(&proxy, &pki, "plain.tunnel.test", h2).await;
        post(
            &mut plain,
            "plain.tunnel.test",
            "/mcp",
            call(base + 9, "echo", json!({})),
        )
        .await;

        let line = audit_line("audited", &(base + 1).to_string()).await;
        assert_eq!(
            field(&line, "method").as_deref(),
            Some("initialize"),
            "{:#?}",
            audit_lines("audited")
        );
        assert_eq!(
            field(&line, "outcome").as_deref(),
            Some("ok"),
            "{:#?}",
            audit_lines("audited")
        );
        assert_eq!(
            field(&line, "session_id").as_deref(),
            Some("sess-1"),
            "{line}"
        );
        assert_eq!(
            field(&line, "protocol_version").as_deref(),
            Some("2025-06-18")
        );
        assert_eq!(field(&line, "caller").as_deref(), Some("127.0.0.1"));
        let line = audit_line("audited", &(base + 2).to_string()).await;
        assert_eq!(field(&line, "tool").as_deref(), Some("echo"));
        assert_eq!(field(&line, "outcome").as_deref(), Some("ok"));
        assert_eq!(field(&line, "http_status").as_deref(), Some("200"));
        assert_eq!(field(&line, "arguments").as_deref(), Some("message"));
        assert!(field(&line, "duration_ms").unwrap().parse::<f64>().unwrap() >= 0.0);
        let line = audit_line("audited", &(base + 3).to_string()).await;
        assert_eq!(field(&line, "outcome").as_deref(), Some("tool_error"));
        let line = audit_line("audited", &(base + 4).to_string()).await;
        assert_eq!(field(&line, "outcome").as_deref(), Some("error"));
        assert_eq!(field(&line, "error_code").as_deref(), Some("-32602"));
        let line = audit_line("audited", &(base + 5).to_string()).await;
        assert_eq!(field(&line, "method").as_deref(), Some("tools/list"));
    }
    let notes: Vec<String> = audit_lines("audited")
        .into_iter()
        .filter(|l| field(l, "method").as_deref() == Some("notifications/initialized"))
        .collect();
    assert_eq!(notes.len(), 2, "{notes:#?}");
    assert_eq!(field(&notes[0], "outcome").as_deref(), Some("accepted"));
    assert!(audit_lines("plain").is_empty());
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    assert!(
        !logs.contains("secret-value-123"),
        "an argument value reached the log"
    );

    let m = metrics_text(&proxy);
    for (series, want) in [
        (
            r#"mcp_tunnel_mcp_messages_total{route="audited",method="tools/call",outcome="ok"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_messages_total{route="audited",method="tools/call",outcome="tool_error"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_messages_total{route="audited",method="tools/call",outcome="error"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_messages_total{route="audited",method="notifications/initialized",outcome="accepted"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_messages_total{route="audited",method="initialize",outcome="ok"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_tool_calls_total{route="audited",tool="echo",outcome="ok"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_tool_calls_total{route="audited",tool="fail",outcome="tool_error"}"#,
            2,
        ),
        // An unknown tool never earns a label of its own.
        (
            r#"mcp_tunnel_mcp_tool_calls_total{route="audited",tool="other",outcome="error"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_request_duration_seconds_count{route="audited",method="tools/call"}"#,
            6,
        ),
        (
            r#"mcp_tunnel_mcp_request_duration_seconds_bucket{route="audited",method="tools/call",le="+Inf"}"#,
            6,
        ),
    ] {
        assert_eq!(sample(&m, series), want, "{series} in\n{m}");
    }
    assert!(!m.contains("route=\"plain\",method"), "{m}");
}

#[tokio::test]
async fn policy_hides_denied_tools_and_refuses_them_without_forwarding() {
    let pki = TestPki::new();
    let seen = Seen::default();
    let up = mcp_server(seen.clone()).await;
    let routes = format!(
        "pol = {{ upstream = \"http://{up}\", tools_deny = [\"get-env\", \"admin*\"], methods_deny = [\"resources/*\"] }}\n"
    );
    let proxy = start(&pki, &routes, "[mcp]\nmax_inspect_bytes = 8192").await;
    let host = "pol.tunnel.test";
    for h2 in [false, true] {
        let mut edge = Edge::connect(&proxy, &pki, host, h2).await;
        // tools/list, JSON and SSE, both pages: the denied tools are gone, the rest intact.
        for path in ["/mcp", "/sse"] {
            let a = post(&mut edge, host, path, list(1, None)).await;
            assert_eq!(a.status, 200);
            assert!(
                a.headers.get("content-length").is_none_or(|l| l
                    .to_str()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
                    == a.body.len())
            );
            let page1 = a.response(json!(1));
            assert_eq!(tool_names(&page1), ["echo"], "{path}: {}", a.body);
            assert_eq!(page1["result"]["nextCursor"], "page-2");
            assert_eq!(page1["result"]["tools"][0]["inputSchema"]["type"], "object");
            let a = post(&mut edge, host, path, list(2, Some("page-2"))).await;
            assert_eq!(tool_names(&a.response(json!(2))), ["add", "fail"], "{path}");
            if path == "/sse" {
                // The other events of the stream pass as they were.
                assert!(a.body.starts_with("event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\""), "{}", a.body);
                assert!(a.body.contains("\n: keep-alive\n\n"), "{}", a.body);
                assert!(a.body.contains("id: ev-1\n"), "{}", a.body);
            }
        }
        // A direct call of a hidden tool: a JSON-RPC error from the proxy, never forwarded.
        for (id, name) in [(3, "get-env"), (4, "admin-reset"), (5, "admin-x")] {
            let a = post(&mut edge, host, "/mcp", call(id, name, json!({}))).await;
            assert_eq!(a.status, 200);
            let r = a.response(json!(id));
            assert_eq!(r["error"]["code"], -32602, "{}", a.body);
            assert!(
                r["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("denied by the tunnel's policy")
            );
        }
        // Allowed tools still work, through JSON and SSE.
        let a = post(
            &mut edge,
            host,
            "/mcp",
            call(6, "echo", json!({"message": "hi"})),
        )
        .await;
        assert!(
            a.response(json!(6))["result"]["content"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("ran echo")
        );
        let a = post(&mut edge, host, "/sse", call(7, "add", json!({"a": 1}))).await;
        assert!(a.response(json!(7))["result"].is_object(), "{}", a.body);
        // A denied method.
        let a = post(&mut edge, host, "/mcp", r#"{"jsonrpc":"2.0","id":8,"method":"resources/read","params":{"uri":"file:///etc/passwd"}}"#).await;
        assert_eq!(a.response(json!(8))["error"]["code"], -32601);
        // A batch mixing allowed and denied calls is refused as a whole.
        let batch = format!(
            "[{},{}]",
            call(9, "echo", json!({})),
            call(10, "get-env", json!({}))
        );
        let a = post(&mut edge, host, "/mcp", batch).await;
        let msgs = a.messages();
        assert_eq!(msgs.len(), 2, "{}", a.body);
        assert_eq!(a.response(json!(9))["error"]["code"], -32603);
        assert_eq!(a.response(json!(10))["error"]["code"], -32602);
        // A notification of a denied method: 403, nothing forwarded.
        let a = post(
            &mut edge,
            host,
            "/mcp",
            r#"{"jsonrpc":"2.0","method":"resources/subscribe"}"#,
        )
        .await;
        assert_eq!(a.status, 403, "{}", a.body);
    }
    let called = seen.called_tools();
    assert_eq!(
        called,
        ["echo", "add", "echo", "add"],
        "only allowed calls reached the upstream"
    );
    assert!(
        seen.all()
            .iter()
            .all(|b| !String::from_utf8_lossy(b).contains("resources/"))
    );

    let line = audit_line("pol", "3").await;
    assert_eq!(field(&line, "outcome").as_deref(), Some("denied"));
    assert_eq!(field(&line, "tool").as_deref(), Some("get-env"));
    assert_eq!(field(&line, "reason").as_deref(), Some("tool_denied"));
    let line = audit_line("pol", "9").await;
    assert_eq!(field(&line, "reason").as_deref(), Some("batch_refused"));
    let m = metrics_text(&proxy);
    for (series, want) in [
        (
            r#"mcp_tunnel_mcp_messages_total{route="pol",method="tools/call",outcome="denied"}"#,
            10,
        ),
        (
            r#"mcp_tunnel_mcp_messages_total{route="pol",method="resources/read",outcome="denied"}"#,
            2,
        ),
        (
            r#"mcp_tunnel_mcp_messages_total{route="pol",method="tools/list",outcome="ok"}"#,
            8,
        ),
        // Listed by the server, so the denied tool has its own label.
        (
            r#"mcp_tunnel_mcp_tool_calls_total{route="pol",tool="get-env",outcome="denied"}"#,
            4,
        ),
        (
            r#"mcp_tunnel_mcp_tool_calls_total{route="pol",tool="echo",outcome="ok"}"#,
            2,
        ),
        (r#"mcp_tunnel_mcp_tools_hidden_total{route="pol"}"#, 12),
    ] {
        assert_eq!(sample(&m, series), want, "{series} in\n{m}");
    }
}

#[tokio::test]
async fn policy_fails_closed_on_what_it_cannot_read() {
    let pki = TestPki::new();
    let seen = Seen::default();
    let up = mcp_server(seen.clone()).await;
    let routes = format!("closed = {{ upstream = \"http://{up}\", tools_deny = [\"get-env\"] }}\n");
    let proxy = start(&pki, &routes, "[mcp]\nmax_inspect_bytes = 8192").await;
    let host = "closed.tunnel.test";
    let mut edge = Edge::connect(&proxy, &pki, host, true).await;
    let big = call(1, "echo", json!({"message": "x".repeat(10_000)}));
    let cases: Vec<(&str, Request<Body>, u16, i64)> = vec![
        (
            "over max_inspect_bytes",
            post_req(host, "/mcp", full(big), true),
            413,
            -32600,
        ),
        (
            "not JSON",
            post_req(
                host,
                "/mcp",
                full("{\"id\":1,\"method\":\"tools/call\""),
                true,
            ),
            400,
            -32700,
        ),
        (
            "duplicate name",
            post_req(
                host,
                "/mcp",
                full(
                    r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"get-env"}}"#,
                ),
                true,
            ),
            400,
            -32700,
        ),
        (
            "BOM",
            post_req(
                host,
                "/mcp",
                full("\u{feff}{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}"),
                true,
            ),
            400,
            -32700,
        ),
        (
            "text/plain",
            Request::builder()
                .method("POST")
                .uri(format!("https://{host}/mcp"))
                .header("content-type", "text/plain")
                .body(full(call(1, "get-env", json!({}))))
                .unwrap(),
            415,
            -32600,
        ),
        (
            "gzip",
            Request::builder()
                .method("POST")
                .uri(format!("https://{host}/mcp"))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(full(call(1, "get-env", json!({}))))
                .unwrap(),
            415,
            -32600,
        ),
    ];
    for (what, req, status, code) in cases {
        let a = send(&mut edge, req).await;
        assert_eq!(a.status, status, "{what}: {}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["error"]["code"], code, "{what}: {}", a.body);
    }
    assert!(seen.all().is_empty(), "nothing unreadable was forwarded");
    // Escapes are decoded before judging, and a call split into 1-byte frames is judged whole.
    let escaped =
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"n\u0061me":"get\u002denv"}}"#;
    let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = escaped
        .as_bytes()
        .iter()
        .map(|b| Ok(Frame::data(Bytes::copy_from_slice(&[*b]))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
    let a = send(&mut edge, post_req(host, "/mcp", body, true)).await;
    assert_eq!(a.response(json!(2))["error"]["code"], -32602, "{}", a.body);
    let allowed = call(3, "echo", json!({"message": "split"}));
    let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = allowed
        .as_bytes()
        .chunks(3)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
    let a = send(&mut edge, post_req(host, "/mcp", body, true)).await;
    assert!(a.response(json!(3))["result"].is_object(), "{}", a.body);
    assert_eq!(
        seen.all(),
        [allowed.into_bytes()],
        "forwarded byte for byte"
    );
    let line = audit_lines("closed")
        .into_iter()
        .find(|l| field(l, "reason").as_deref() == Some("request_too_large"))
        .expect("audit line for the refused body");
    assert_eq!(field(&line, "outcome").as_deref(), Some("denied"));
}

#[tokio::test]
async fn without_a_policy_the_body_streams_and_big_ones_pass_uninspected() {
    let pki = TestPki::new();
    // The upstream reports the first bytes it gets; the client sends the rest only then.
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<usize>();
    let up = upstream(move |req: Request<Incoming>| {
        let got_tx = got_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    total += d.len();
                    let _ = got_tx.send(d.len());
                }
            }
            Response::builder()
                .header("content-type", "application/json")
                .body(full(format!(
                    r#"{{"jsonrpc":"2.0","id":1,"result":{{"content":[],"got":{total}}}}}"#
                )))
                .unwrap()
        }
    })
    .await;
    let routes = format!("ins = {{ upstream = \"http://{up}\", inspect = true }}\n");
    let proxy = start(&pki, &routes, "[mcp]\nmax_inspect_bytes = 4096").await;
    let host = "ins.tunnel.test";
    let mut edge = Edge::connect(&proxy, &pki, host, true).await;
    let body = call(1, "echo", json!({"message": "y".repeat(20_000)}));
    let (head, tail) = body.split_at(100);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
    tx.send(Ok(Frame::data(Bytes::from(head.to_owned()))))
        .await
        .unwrap();
    let stream = futures_util::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    });
    let req = post_req(host, "/mcp", BodyExt::boxed(StreamBody::new(stream)), true);
    let answer = tokio::spawn(async move { send(&mut edge, req).await });
    let first = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
        .await
        .expect("the upstream got the first bytes before the body ended: no buffering")
        .unwrap();
    assert!(first <= 100);
    tx.send(Ok(Frame::data(Bytes::from(tail.to_owned()))))
        .await
        .unwrap();
    drop(tx);
    let a = answer.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        a.response(json!(1))["result"]["got"],
        body.len(),
        "forwarded whole"
    );
    let m = metrics_text(&proxy);
    assert_eq!(
        sample(
            &m,
            r#"mcp_tunnel_mcp_uninspected_total{route="ins",reason="request_too_large"}"#
        ),
        1,
        "{m}"
    );
    let lines = audit_lines("ins");
    assert!(
        lines.iter().any(|l| l.contains("mcp request not inspected")
            && field(l, "reason").as_deref() == Some("request_too_large")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn policy_sse_stream_flows_event_by_event_and_is_filtered() {
    // The upstream writes event k only after the client has received event k-1 through the
    // proxy: holding any complete event back would deadlock (caught by the timeout).
    let pki = TestPki::new();
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let produced = Arc::new(AtomicUsize::new(0));
    const EVENTS: usize = 6;
    let up = {
        let produced = produced.clone();
        upstream(move |_req: Request<Incoming>| {
            let release_rx = release_rx.clone();
            let produced = produced.clone();
            async move {
                let mut rx = release_rx.lock().await.take().expect("one stream");
                let (tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
                tokio::spawn(async move {
                    for k in 0..EVENTS {
                        if k > 0 && rx.recv().await.is_none() {
                            return;
                        }
                        produced.store(k + 1, Ordering::SeqCst);
                        // Event 3 is a tools/list result (a resumed stream may carry one);
                        // each event comes in two writes to exercise the event reassembly.
                        let data = if k == 3 {
                            json!({"jsonrpc": "2.0", "id": 40, "result": {"tools": [tool("echo"), tool("get-env")]}})
                        } else {
                            json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"k": k}})
                        };
                        let ev = format!("id: {k}\nevent: message\ndata: {data}\n\n");
                        let (a, b) = ev.split_at(ev.len() / 2);
                        for part in [a, b] {
                            if tx.send(Ok(Frame::data(Bytes::from(part.to_owned())))).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                let stream = futures_util::stream::poll_fn({
                    let mut body_rx = body_rx;
                    move |cx| body_rx.poll_recv(cx)
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
        })
        .await
    };
    let routes = format!("ssepol = {{ upstream = \"http://{up}\", tools_deny = [\"get-env\"] }}\n");
    let proxy = start(&pki, &routes, "").await;
    let mut edge = Edge::connect(&proxy, &pki, "ssepol.tunnel.test", false).await;
    let resp = edge
        .send(request(
            "GET",
            "ssepol.tunnel.test",
            "/mcp",
            full(""),
            false,
        ))
        .await;
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while seen.len() < EVENTS {
            let frame = body.frame().await.expect("stream ended early").unwrap();
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let k: usize = event
                    .lines()
                    .next()
                    .unwrap()
                    .strip_prefix("id: ")
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(
                    produced.load(Ordering::SeqCst),
                    k + 1,
                    "event {k} held back"
                );
                if k == 3 {
                    assert!(
                        event.contains("\"echo\"") && !event.contains("get-env"),
                        "{event}"
                    );
                    assert!(
                        event.starts_with("id: 3\nevent: message\ndata: "),
                        "{event}"
                    );
                }
                seen.push(k);
                let _ = release_tx.send(());
            }
        }
    })
    .await
    .expect("SSE events were held back by the proxy");
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
}

#[tokio::test]
async fn hostile_input_neither_panics_nor_bypasses_the_policy() {
    let pki = TestPki::new();
    let seen = Seen::default();
    let up = mcp_server(seen.clone()).await;
    let routes = format!(
        "hpol = {{ upstream = \"http://{up}\", tools_allow = [\"echo\", \"add\"] }}\nhins = {{ upstream = \"http://{up}\", inspect = true }}\n"
    );
    let proxy = start(
        &pki,
        &routes,
        "[mcp]\nmax_inspect_bytes = 65536\nmax_tool_labels = 10",
    )
    .await;
    let mut pol = Edge::connect(&proxy, &pki, "hpol.tunnel.test", true).await;
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let hostile = [
        format!(r#"{{"jsonrpc":"2.0","id":"{}","method":"tools/call","params":{{"name":"get-env"}}}}"#, "i".repeat(50_000)),
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"get-env","arguments":{deep}}}}}"#),
        format!(r#"{{"jsonrpc":"2.0","id":{deep},"method":"tools/call","params":{{"name":"get-env"}}}}"#),
        deep.clone(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ge\u0074-env"}}"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo\u0000"}}"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"Echo"}}"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["get-env"]}"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":null}}"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\ud800"}}"#.to_string(),
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}},[{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get-env"}}]]"#.to_string(),
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}},{"jsonrpc":"2.0","method":"tools/call","params":{"name":"get-env"}}]"#.to_string(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}} {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get-env"}}"#.to_string(),
        "\u{0}\u{1}garbage".to_string(),
        String::new(),
        format!(r#"[{}]"#, vec![r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#; 2000].join(",") + r#",{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get-env"}}"#),
    ];
    for (i, body) in hostile.iter().enumerate() {
        let a = post(&mut pol, "hpol.tunnel.test", "/mcp", body.clone()).await;
        assert!(a.status == 200 || a.status >= 400, "case {i}: {}", a.status);
    }
    // Invalid UTF-8 in a string.
    let mut bytes =
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get-env"#.to_vec();
    bytes.extend_from_slice(b"\xff\"}}");
    let a = send(
        &mut pol,
        post_req("hpol.tunnel.test", "/mcp", full(bytes), true),
    )
    .await;
    assert_eq!(a.status, 400);
    let called = seen.called_tools();
    assert!(
        called.iter().all(|t| t == "echo" || t == "add"),
        "a tool outside tools_allow reached the upstream: {called:?}"
    );
    // The proxy still answers an allowed call.
    let a = post(
        &mut pol,
        "hpol.tunnel.test",
        "/mcp",
        call(77, "echo", json!({})),
    )
    .await;
    assert!(a.response(json!(77))["result"].is_object());

    // Thousands of made-up tool names on an inspected route: the label set stays bounded.
    let mut ins = Edge::connect(&proxy, &pki, "hins.tunnel.test", true).await;
    post(&mut ins, "hins.tunnel.test", "/mcp", list(1, None)).await;
    for i in 0..3000 {
        let a = post(
            &mut ins,
            "hins.tunnel.test",
            "/mcp",
            call(i, &format!("tool-{i}"), json!({})),
        )
        .await;
        assert_eq!(a.status, 200);
    }
    let m = metrics_text(&proxy);
    let labels: HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("mcp_tunnel_mcp_tool_calls_total{route=\"hins\""))
        .filter_map(|l| l.split("tool=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(labels, HashSet::from(["other"]), "{m}");
    assert_eq!(
        sample(
            &m,
            r#"mcp_tunnel_mcp_tool_calls_total{route="hins",tool="other",outcome="error"}"#
        ),
        3000
    );
    let ids: Vec<String> = audit_lines("hpol")
        .iter()
        .filter_map(|l| field(l, "rpc_id"))
        .collect();
    assert!(
        ids.iter().all(|id| id.chars().count() <= 70),
        "ids in the log are bounded"
    );
}

#[tokio::test]
async fn policy_reloads_live_and_closes_streams_it_no_longer_covers() {
    let pki = TestPki::new();
    let seen = Seen::default();
    let up = mcp_server(seen.clone()).await;
    // A second upstream serving an endless SSE stream, to see it closed by the change.
    let sse_up = upstream(|_req: Request<Incoming>| async move {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
        tokio::spawn(async move {
            loop {
                let ev = Bytes::from_static(b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}\n\n");
                if tx.send(Ok(Frame::data(ev))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let stream = futures_util::stream::poll_fn({
            let mut rx = rx;
            move |cx| rx.poll_recv(cx)
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    })
    .await;
    capture_logs();
    let path = pki.path("mcp-tunnel.toml");
    let text = |deny: &str| {
        config_text(
            &pki,
            "",
            &format!(
                "rpol = {{ upstream = \"http://{up}\", tools_deny = [{deny}] }}\nstream = {{ upstream = \"http://{sse_up}\", tools_deny = [{deny}] }}\nkept = {{ upstream = \"http://{sse_up}\", inspect = true }}\n"
            ),
            LOOPBACK,
        )
    };
    std::fs::write(&path, text("\"get-env\"")).unwrap();
    let config = Config::load(&path).unwrap();
    let (_, facts) = reload::load_checked(&config, unix_now()).unwrap();
    let proxy = TestProxy::start(&pki, &text("\"get-env\"")).await;
    let reloader = Reloader::new(config, proxy.proxy.clone(), facts);

    let mut edge = Edge::connect(&proxy, &pki, "rpol.tunnel.test", false).await;
    let a = post(&mut edge, "rpol.tunnel.test", "/mcp", list(1, None)).await;
    assert_eq!(tool_names(&a.response(json!(1))), ["echo", "admin-reset"]);
    let mut open = Vec::new();
    for name in ["stream", "kept"] {
        let host = format!("{name}.tunnel.test");
        let mut e = Edge::connect(&proxy, &pki, &host, false).await;
        let resp = e.send(request("GET", &host, "/mcp", full(""), false)).await;
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        open.push((name, body, e));
    }

    std::fs::write(&path, text("\"admin*\"")).unwrap();
    reloader.reload(unix_now()).await.expect("reload applies");
    let a = post(&mut edge, "rpol.tunnel.test", "/mcp", list(2, None)).await;
    assert_eq!(
        tool_names(&a.response(json!(2))),
        ["echo", "get-env"],
        "the new policy applies at once"
    );
    let a = post(
        &mut edge,
        "rpol.tunnel.test",
        "/mcp",
        call(3, "admin-reset", json!({})),
    )
    .await;
    assert_eq!(a.response(json!(3))["error"]["code"], -32602);
    for (name, mut body, _e) in open {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match body.frame().await {
                    Some(Ok(_)) => continue,
                    _ => return true,
                }
            }
        })
        .await;
        match name {
            "stream" => assert!(
                ended.is_ok(),
                "the stream of the route whose policy changed was closed"
            ),
            _ => assert!(
                ended.is_err(),
                "the stream of an unchanged route keeps flowing"
            ),
        }
    }
    // An invalid policy is refused; the running one stays.
    std::fs::write(&path, text("\"\"")).unwrap();
    let err = reloader.reload(unix_now()).await.unwrap_err().to_string();
    assert!(err.contains("routes.rpol.tools_deny[0]"), "{err}");
    let a = post(
        &mut edge,
        "rpol.tunnel.test",
        "/mcp",
        call(4, "admin-reset", json!({})),
    )
    .await;
    assert_eq!(a.response(json!(4))["error"]["code"], -32602);
}

#[test]
fn documented_examples_are_valid_configs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("### Example: read-only exposure of a server")
        .nth(1)
        .expect("README has the read-only example");
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .take(2)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 2);
    // The same example, commented, in the documented config file.
    let example = std::fs::read_to_string(root.join("config/mcp-tunnel.toml")).unwrap();
    let commented: String = example
        .lines()
        .skip_while(|l| !l.starts_with("#   [routes.files]"))
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    assert!(commented.contains("tools_allow"), "{commented}");
    for block in blocks.iter().copied().chain([commented.as_str()]) {
        let text = format!(
            "tunnel_domain = \"t.example\"\n[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n{block}"
        );
        let c = Config::parse(
            std::path::Path::new("/etc/mcp-tunnel/mcp-tunnel.toml"),
            &text,
        )
        .unwrap_or_else(|e| panic!("{e}\n{block}"));
        for r in &c.routes {
            assert!(r.mcp.active(), "{}", r.name);
        }
        if let Some(files) = c.routes.iter().find(|r| r.name == "files") {
            let p = files.mcp.policy.as_ref().unwrap();
            assert!(p.allows_tool("read_text_file") && p.allows_tool("list_directory"));
            for write in ["write_file", "edit_file", "move_file", "create_directory"] {
                assert!(!p.allows_tool(write), "{write}");
            }
        }
    }
}

// ------------------------------------------------------------------ MCP 2026-07-28 headers

/// A 2026-07-28 request: the revision in `_meta`, and the standard headers (SEP-2243).
fn modern_post(host: &str, body: &Value, headers: &[(&str, &str)], h2: bool) -> Request<Body> {
    let b = Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    let b = headers.iter().fold(b, |b, (k, v)| b.header(*k, *v));
    let b = if h2 {
        b.uri(format!("https://{host}/mcp"))
    } else {
        b.uri("/mcp").header("host", host)
    };
    b.body(full(body.to_string())).unwrap()
}

fn modern_call(id: u64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": tool, "arguments": {"region": "us-west1"},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
        }
    }})
}

#[tokio::test]
async fn modern_headers_that_disagree_with_the_body_are_refused_before_the_upstream() {
    let pki = TestPki::new();
    // The upstream keeps the headers and body of every request it gets.
    let got: Arc<Mutex<Vec<(HeaderMap, Value)>>> = Arc::default();
    let up = {
        let got = got.clone();
        upstream(move |req: Request<Incoming>| {
            let got = got.clone();
            async move {
                let headers = req.headers().clone();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                got.lock().unwrap().push((headers, v.clone()));
                let out = json!({"jsonrpc": "2.0", "id": v["id"], "result": {
                    "resultType": "complete", "content": [{"type": "text", "text": "ok"}]}});
                Response::builder()
                    .header("content-type", "application/json")
                    .body(full(out.to_string()))
                    .unwrap()
            }
        })
        .await
    };
    let routes = format!(
        "sepinsp = {{ upstream = \"http://{up}\", inspect = true }}\n\
         seppol = {{ upstream = \"http://{up}\", tools_deny = [\"admin*\"] }}\n\
         sepplain = \"http://{up}\"\n"
    );
    let proxy = start(&pki, &routes, "[mcp]\nmax_inspect_bytes = 65536").await;
    let agree = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo"),
        ("mcp-param-region", "us-west1"),
    ];
    let mut id = 0;
    for h2 in [false, true] {
        for route in ["sepinsp", "seppol"] {
            let host = format!("{route}.tunnel.test");
            let mut edge = Edge::connect(&proxy, &pki, &host, h2).await;
            // Headers that agree: forwarded, every header as the client sent it.
            id += 1;
            let before = got.lock().unwrap().len();
            let a = send(
                &mut edge,
                modern_post(&host, &modern_call(id, "echo"), &agree, h2),
            )
            .await;
            assert_eq!(a.status, 200, "{route}: {}", a.body);
            {
                let got = got.lock().unwrap();
                assert_eq!(got.len(), before + 1);
                let (h, body) = got.last().unwrap();
                for (k, v) in agree {
                    assert_eq!(h.get(k).unwrap(), v, "{route}: {k} forwarded untouched");
                }
                assert_eq!(body, &modern_call(id, "echo"));
            }
            let line = audit_line(route, &id.to_string()).await;
            assert_eq!(field(&line, "outcome").as_deref(), Some("ok"), "{line}");
            assert_eq!(
                field(&line, "protocol_version").as_deref(),
                Some("2026-07-28"),
                "{line}"
            );
            assert_eq!(
                field(&line, "trace_id").as_deref(),
                Some("0af7651916cd43dd8448eb211c80319c"),
                "{line}"
            );
            assert_eq!(field(&line, "session_id"), None, "{line}");

            // Each way the headers can disagree: 400 and -32020 from the proxy, nothing sent on.
            let admin = modern_call(0, "admin-reset");
            let mismatches: [(&[(&str, &str)], Value); 5] = [
                // The header names an allowed tool, the body calls a denied one.
                (&agree, admin.clone()),
                (
                    &[agree[0], ("mcp-method", "tools/list"), agree[2]],
                    modern_call(0, "echo"),
                ),
                (&[agree[0], agree[1]], modern_call(0, "echo")),
                (
                    &[agree[0], agree[1], ("mcp-name", "=?base64?ZWNobw?=")],
                    modern_call(0, "echo"),
                ),
                (
                    &[agree[0], agree[1], agree[2], ("mcp-name", "echo")],
                    modern_call(0, "echo"),
                ),
            ];
            for (headers, mut body) in mismatches {
                id += 1;
                body["id"] = json!(id);
                let before = got.lock().unwrap().len();
                let a = send(&mut edge, modern_post(&host, &body, headers, h2)).await;
                assert_eq!(a.status, 400, "{route} {headers:?}: {}", a.body);
                let r = a.response(json!(id));
                assert_eq!(r["error"]["code"], -32020, "{}", a.body);
                assert!(
                    r["error"]["message"]
                        .as_str()
                        .unwrap()
                        .starts_with("Header mismatch: "),
                    "{}",
                    a.body
                );
                assert_eq!(
                    got.lock().unwrap().len(),
                    before,
                    "{route}: never forwarded"
                );
                let line = audit_line(route, &id.to_string()).await;
                assert_eq!(field(&line, "outcome").as_deref(), Some("denied"), "{line}");
                assert_eq!(
                    field(&line, "reason").as_deref(),
                    Some("header_mismatch"),
                    "{line}"
                );
                assert_eq!(
                    field(&line, "error_code").as_deref(),
                    Some("-32020"),
                    "{line}"
                );
            }
        }
        // A plain route reads nothing and passes the same disagreeing request on as it is.
        let host = "sepplain.tunnel.test";
        let mut edge = Edge::connect(&proxy, &pki, host, h2).await;
        id += 1;
        let mut body = modern_call(0, "admin-reset");
        body["id"] = json!(id);
        let a = send(&mut edge, modern_post(host, &body, &agree, h2)).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let got = got.lock().unwrap();
        let (h, forwarded) = got.last().unwrap();
        assert_eq!(h.get("mcp-name").unwrap(), "echo");
        assert_eq!(forwarded, &body);
    }
    // Over mcp.max_inspect_bytes (64 KiB here): an audit-only route passes it on uninspected, as
    // any body too large to read; a policy route cannot judge it and refuses it.
    let mut big = modern_call(0, "echo");
    big["params"]["arguments"]["blob"] = json!("x".repeat(70_000));
    for (route, want) in [("sepinsp", 200), ("seppol", 413)] {
        let host = format!("{route}.tunnel.test");
        // h2: a refusal before the body is read resets one stream, not the connection.
        let mut edge = Edge::connect(&proxy, &pki, &host, true).await;
        let before = got.lock().unwrap().len();
        let a = send(&mut edge, modern_post(&host, &big, &agree, true)).await;
        assert_eq!(
            a.status,
            want,
            "{route}: {}",
            &a.body[..a.body.len().min(200)]
        );
        let forwarded = got.lock().unwrap().len() - before;
        assert_eq!(forwarded, usize::from(want == 200), "{route}");
    }
    let text = metrics_text(&proxy);
    for route in ["sepinsp", "seppol"] {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "mcp_tunnel_mcp_refused_total{{route=\"{route}\",reason=\"header_mismatch\"}}"
                )
            ),
            10,
            "{text}"
        );
    }
}

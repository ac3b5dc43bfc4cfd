//! `mcp-tunnel status`: a human summary of a running appliance, read from its admin
//! endpoint (`/status`), so it works as any user who can reach loopback.

use std::net::SocketAddr;
use std::path::Path;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::config::{Config, admin::DEFAULT_ADMIN_ADDR};

/// One GET to the admin endpoint: status code and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the admin endpoint at {addr}: {e} (is `mcp-tunnel run` running with [admin] enabled?)"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn num(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_i64().map(|n| n.max(0) as u64))
        .unwrap_or(0)
}

/// Renders the summary from the `/status` document (counts are integers: no `-0`).
pub fn summary(addr: SocketAddr, status: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let v: serde_json::Value = serde_json::from_str(status).unwrap_or_default();
    let ready = v["ready"].as_bool().unwrap_or(false);
    let _ = writeln!(
        out,
        "mcp-tunnel ({addr}): {}",
        if ready { "READY" } else { "NOT READY" }
    );
    for c in v["components"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<12} {:<9} {}{}",
            c["name"].as_str().unwrap_or("?"),
            if c["ready"].as_bool() == Some(true) {
                "ready"
            } else {
                "NOT READY"
            },
            c["state"].as_str().unwrap_or(""),
            c["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        );
    }
    let cf = &v["cloudflared"];
    if cf["enabled"].as_bool() == Some(true) {
        let version = cf["version"]
            .as_str()
            .map(|l| {
                crate::cloudflared::inspect::version_number(l)
                    .unwrap_or(l)
                    .to_string()
            })
            .unwrap_or_else(|| "version unknown".into());
        let _ = writeln!(
            out,
            "  cloudflared {version}, connector {}, {}/{} connections, {} restart{}{}",
            cf["connector_id"].as_str().unwrap_or("unknown"),
            num(&cf["connections"]),
            num(&cf["expected_connections"]),
            num(&cf["restarts"]),
            if num(&cf["restarts"]) == 1 { "" } else { "s" },
            cf["last_problem"]
                .as_str()
                .map(|p| format!(", last problem: {p}"))
                .unwrap_or_default(),
        );
    } else {
        let _ = writeln!(
            out,
            "  cloudflared disabled ([cloudflared] enabled = false)"
        );
    }
    match v["certificate"]["days_left"].as_i64() {
        Some(d) if d < 0 => {
            let _ = writeln!(out, "  certificate EXPIRED {} days ago", -d);
        }
        Some(d) => {
            let _ = writeln!(out, "  certificate expires in {d} days");
        }
        None => {
            let _ = writeln!(out, "  certificate expiry unknown");
        }
    }
    let c = &v["config"];
    let _ = writeln!(
        out,
        "  config generation {}, reload failures {}{}",
        num(&c["generation"]),
        num(&c["reload_failures"]),
        c["last_reload_error"]
            .as_str()
            .map(|e| format!(", last refused reload: {e}"))
            .unwrap_or_default(),
    );
    if let Some(fields) = c["restart_required"].as_array().filter(|f| !f.is_empty()) {
        let names: Vec<&str> = fields.iter().filter_map(|f| f.as_str()).collect();
        let _ = writeln!(
            out,
            "  restart required to apply: {} (changed in the file; the running values stay)",
            names.join(", ")
        );
    }
    let r = &v["requests"];
    let _ = writeln!(
        out,
        "  requests {}, refused {}, sessions open {}, in flight {}",
        num(&r["total"]),
        num(&r["refused"]),
        num(&r["sessions_open"]),
        num(&r["in_flight"]),
    );
    let pc = &v["peer_check"];
    if pc["on"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "  listener connections refused by the peer check: {} from other users, {} of unknown owner",
            num(&pc["refused_other_user"]),
            num(&pc["refused_unknown_owner"]),
        );
    }
    if let Some(plain) = v["not_audited"].as_array().filter(|p| !p.is_empty()) {
        let names: Vec<&str> = plain.iter().filter_map(|r| r.as_str()).collect();
        let _ = writeln!(
            out,
            "  not audited (MCP traffic forwarded unread, no audit line): {}",
            names.join(", ")
        );
    }
    let routes = v["routes"].as_array().cloned().unwrap_or_default();
    if !routes.is_empty() {
        let _ = writeln!(out, "  {:<24} {:>10} {:>8}", "route", "requests", "errors");
        for route in routes {
            let name = match route["route"].as_str() {
                Some("") | None => "(no route)",
                Some(n) => n,
            };
            let _ = writeln!(
                out,
                "  {name:<24} {:>10} {:>8}",
                num(&route["requests"]),
                num(&route["errors"])
            );
        }
    }
    out
}

/// One line about inspected routes (`inspect = true` or a tool policy), if there are any.
/// Sums the samples of one metric (all label sets).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One line about inspected MCP routes, from `/metrics` (empty without them).
fn mcp_summary(metrics: &str) -> String {
    let messages = "mcp_tunnel_mcp_messages_total";
    if !metrics
        .lines()
        .any(|l| l.starts_with(&format!("{messages}{{")))
    {
        return String::new();
    }
    let denied: f64 = metrics
        .lines()
        .filter(|l| l.starts_with(messages) && l.contains("outcome=\"denied\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    format!(
        "  mcp messages {}, denied by policy {}, tool calls {}, tools hidden {} (audit log: journalctl -u mcp-tunnel TARGET=mcp_audit)\n",
        metric_sum(metrics, messages),
        denied,
        metric_sum(metrics, "mcp_tunnel_mcp_tool_calls_total"),
        metric_sum(metrics, "mcp_tunnel_mcp_tools_hidden_total"),
    )
}

/// The admin endpoint a client command talks to: `--admin`, else the config's
/// `[admin] listen_addr`, else the default.
pub(crate) fn admin_addr(admin: Option<SocketAddr>, config: &Path) -> SocketAddr {
    admin.unwrap_or_else(|| match Config::load(config) {
        Ok(c) => c.admin.listen_addr,
        Err(_) => DEFAULT_ADMIN_ADDR.parse().expect("valid default"),
    })
}

/// The service's PID as its `/readyz` body names it, so that client commands can signal it
/// (the kernel decides whether they may).
pub(crate) fn pid_in_readyz(body: &str) -> Option<u32> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
}

/// A small runtime for a client command; `None` (reported) if it cannot start.
pub(crate) fn client_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("error: {e}"))
        .ok()
}

/// Exit status: 0 ready, 1 not ready, 2 unreachable.
pub fn print(admin: Option<SocketAddr>, config: &Path) -> u8 {
    let addr = admin_addr(admin, config);
    let Some(rt) = client_runtime() else {
        return 2;
    };
    match rt.block_on(get(addr, "/status")) {
        Ok((code, body)) => {
            print!("{}", summary(addr, &body));
            // Inspected MCP routes: one line from /metrics (absent without them).
            if let Ok((_, metrics)) = rt.block_on(get(addr, "/metrics")) {
                print!("{}", mcp_summary(&metrics));
            }
            if code == 200 { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("error: {e}");
            // A severed host refuses to start: say so, or the operator restarts it in vain.
            let cfg = crate::config::Config::load(config).ok();
            let marker = crate::incident::sever::marker_path(
                cfg.as_ref(),
                std::env::var_os("STATE_DIRECTORY").as_deref(),
            );
            if let Ok(Some(m)) = crate::incident::sever::read(&marker) {
                println!("SEVERED: {}", crate::incident::sever::describe(&m, &marker));
            }
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use crate::telemetry::admin::status_json;
    use crate::telemetry::metrics::AppState;

    #[test]
    fn no_negative_zero_and_per_route_counts() {
        let s = AppState::new(Arc::default(), false);
        s.listener_bound.store(true, Ordering::Relaxed);
        s.cert_not_after
            .store(1000 + 61 * 86400 + 5, Ordering::Relaxed);
        let addr = "127.0.0.1:9180".parse().unwrap();
        let text = super::summary(addr, &status_json(&s, 1000).to_string());
        assert!(
            text.contains("requests 0, refused 0, sessions open 0"),
            "{text}"
        );
        assert!(!text.contains("-0"), "{text}");
        assert!(text.contains("certificate expires in 61 days"), "{text}");
        s.proxy.request("echo", 200);
        s.proxy.request("echo", 502);
        s.proxy.request("echo", 200);
        s.proxy.request("", 502);
        *s.last_reload_error.lock().unwrap() = Some("routes.x: bad".into());
        let text = super::summary(addr, &status_json(&s, 1000).to_string());
        let row = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        };
        assert_eq!(row("echo").as_deref(), Some("echo 3 1"), "{text}");
        assert_eq!(
            row("(no route)").as_deref(),
            Some("(no route) 1 1"),
            "{text}"
        );
        assert!(text.contains("requests 4,"), "{text}");
        assert!(
            text.contains("last refused reload: routes.x: bad"),
            "{text}"
        );
    }

    #[test]
    fn mcp_line_only_with_inspected_routes() {
        let without = "mcp_tunnel_requests_total{route=\"a\",status=\"200\"} 3\n# HELP mcp_tunnel_mcp_messages_total x\n";
        assert_eq!(super::mcp_summary(without), "");
        let with = "mcp_tunnel_mcp_messages_total{route=\"a\",method=\"tools/call\",outcome=\"ok\"} 5\nmcp_tunnel_mcp_messages_total{route=\"a\",method=\"tools/call\",outcome=\"denied\"} 2\nmcp_tunnel_mcp_tool_calls_total{route=\"a\",tool=\"echo\",outcome=\"ok\"} 5\nmcp_tunnel_mcp_tools_hidden_total{route=\"a\"} 4\n";
        assert_eq!(
            super::mcp_summary(with),
            "  mcp messages 7, denied by policy 2, tool calls 5, tools hidden 4 (audit log: journalctl -u mcp-tunnel TARGET=mcp_audit)\n"
        );
    }
}

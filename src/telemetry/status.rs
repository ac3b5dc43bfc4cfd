//! `mcp-tunnel status`: a human summary of a running appliance, read from its admin
//! endpoint (`/readyz` and `/metrics`), so it works as any user who can reach loopback.

use std::net::SocketAddr;
use std::path::Path;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::config::{Config, admin::DEFAULT_ADMIN_ADDR};

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
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

/// Renders the summary from the two bodies.
pub fn summary(addr: SocketAddr, readyz: &str, metrics: &str) -> String {
    let mut out = String::new();
    let v: serde_json::Value = serde_json::from_str(readyz).unwrap_or_default();
    let ready = v["ready"].as_bool().unwrap_or(false);
    out.push_str(&format!(
        "mcp-tunnel ({addr}): {}\n",
        if ready { "READY" } else { "NOT READY" }
    ));
    for c in v["components"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<12} {:<9} {}{}\n",
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
        ));
    }
    out.push_str(&format!(
        "  requests {}, refused {}, sessions open {}, cloudflared restarts {}, config generation {}, reload failures {}\n",
        metric_sum(metrics, "mcp_tunnel_requests_total"),
        metric_sum(metrics, "mcp_tunnel_refusals_total"),
        metric_sum(metrics, "mcp_tunnel_sessions_open"),
        metric_sum(metrics, "mcp_tunnel_cloudflared_restarts_total"),
        metric_sum(metrics, "mcp_tunnel_config_generation"),
        metric_sum(metrics, "mcp_tunnel_config_reload_failures_total"),
    ));
    out.push_str(&mcp_summary(metrics));
    out
}

/// One line about inspected routes (`inspect = true` or a tool policy), if there are any.
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

/// Exit status: 0 ready, 1 not ready, 2 unreachable.
pub fn print(admin: Option<SocketAddr>, config: &Path) -> u8 {
    let addr = admin.unwrap_or_else(|| match Config::load(config) {
        Ok(c) => c.admin.listen_addr,
        Err(_) => DEFAULT_ADMIN_ADDR.parse().expect("valid default"),
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let fetched = rt.block_on(async {
        let r = get(addr, "/readyz").await?;
        let m = get(addr, "/metrics").await?;
        Ok::<_, String>((r, m))
    });
    match fetched {
        Ok(((code, readyz), (_, metrics))) => {
            print!("{}", summary(addr, &readyz, &metrics));
            if code == 200 { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcp_line_only_with_inspected_routes() {
        let without = "mcp_tunnel_requests_total{route=\"a\",status=\"200\"} 3\n# HELP mcp_tunnel_mcp_messages_total x\n";
        assert_eq!(mcp_summary(without), "");
        let with = "mcp_tunnel_mcp_messages_total{route=\"a\",method=\"tools/call\",outcome=\"ok\"} 5\nmcp_tunnel_mcp_messages_total{route=\"a\",method=\"tools/call\",outcome=\"denied\"} 2\nmcp_tunnel_mcp_tool_calls_total{route=\"a\",tool=\"echo\",outcome=\"ok\"} 5\nmcp_tunnel_mcp_tools_hidden_total{route=\"a\"} 4\n";
        assert_eq!(
            mcp_summary(with),
            "  mcp messages 7, denied by policy 2, tool calls 5, tools hidden 4 (audit log: journalctl -u mcp-tunnel TARGET=mcp_audit)\n"
        );
    }
}

//! The status page the admin endpoint serves at `/`: what `/readyz` and `/metrics` say, for a
//! person with a browser. One self-contained HTML document (inline CSS, no script, no external
//! asset), every value HTML-escaped.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::metrics::{AppState, readiness};
use crate::cloudflared::policy::{EXPECTED_CONNECTIONS, Health};
use crate::proxy::metrics::{UpstreamOutcome, UpstreamVerdict};

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `2026-11-01 12:34:56 UTC`.
fn utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => unix.to_string(),
    }
}

/// `42 s ago`, `5 min ago`, `3 h ago`, `2 d ago`.
fn ago(now: i64, then: i64) -> String {
    let s = (now - then).max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}

fn verdict_text(v: Option<&UpstreamVerdict>, now: i64) -> (bool, String) {
    match v {
        None => (true, "no request forwarded yet".into()),
        Some(v) => match v.outcome {
            UpstreamOutcome::Answered(status) => (
                status < 500,
                format!("answered {status}, {}", ago(now, v.at)),
            ),
            UpstreamOutcome::Failed(why) => (
                false,
                format!("{}, {}", why.as_str().replace('_', " "), ago(now, v.at)),
            ),
        },
    }
}

fn badge(ok: bool, text: &str) -> String {
    format!(
        "<span class=\"{}\">{}</span>",
        if ok { "ok" } else { "bad" },
        escape(text)
    )
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:70em;padding:0 1em;color:#222}\
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#0a6b2d;font-weight:600}.bad{color:#b00020;font-weight:600}.muted{color:#666}\
code{font-size:.95em}#cloudflared th,#config th{width:15em}";

/// The page at `now` (Unix seconds).
pub fn render(s: &AppState, now: i64) -> String {
    let comps = readiness(s, now);
    let ready = comps.iter().all(|c| c.ready);
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width\">\
<meta http-equiv=\"refresh\" content=\"15\">\
<title>mcp-tunnel: {}</title><style>{STYLE}</style></head><body>\n",
        if ready { "ready" } else { "NOT READY" }
    );
    let _ = write!(
        o,
        "<h1>mcp-tunnel <span id=\"overall\">{}</span></h1>\n<p class=\"muted\">version {} &middot; {} &middot; refreshes every 15 s &middot; <a href=\"/readyz\">/readyz</a> &middot; <a href=\"/metrics\">/metrics</a></p>\n",
        badge(ready, if ready { "READY" } else { "NOT READY" }),
        escape(env!("CARGO_PKG_VERSION")),
        escape(&utc(now)),
    );

    o.push_str("<h2>Readiness</h2>\n<table id=\"components\"><tr><th>component</th><th>ready</th><th>state</th><th>reason</th></tr>\n");
    for c in &comps {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(c.name),
            badge(c.ready, if c.ready { "yes" } else { "no" }),
            escape(&c.state),
            escape(c.reason.as_deref().unwrap_or("")),
        );
    }
    o.push_str("</table>\n");

    routes(&mut o, s, now);
    tunnel(&mut o, s);

    o.push_str("<h2>Certificate and configuration</h2>\n<table id=\"config\">\n");
    let na = s.cert_not_after.load(Ordering::Relaxed);
    let cert = if na == 0 {
        badge(false, "not loaded")
    } else if na <= now {
        badge(false, &format!("expired {}", utc(na)))
    } else {
        let days = (na - now) / 86400;
        format!(
            "{} (until {})",
            badge(days >= 14, &format!("{days} days left")),
            escape(&utc(na))
        )
    };
    let _ = writeln!(
        o,
        "<tr><th>server certificate</th><td>{cert}</td></tr>\n<tr><th>config generation</th><td>{}</td></tr>",
        s.config_generation.load(Ordering::Relaxed)
    );
    let reload = match s.last_reload() {
        None => "none since start".to_string(),
        Some(l) => match &l.error {
            None => format!(
                "{} at {} ({})",
                badge(true, "applied"),
                escape(&utc(l.at)),
                escape(&ago(now, l.at))
            ),
            Some(e) => format!(
                "{} at {} ({}): {}",
                badge(false, "refused"),
                escape(&utc(l.at)),
                escape(&ago(now, l.at)),
                escape(e)
            ),
        },
    };
    let _ = writeln!(
        o,
        "<tr><th>last reload</th><td>{reload}</td></tr>\n<tr><th>reloads refused since start</th><td>{}</td></tr>\n<tr><th>certificate renewals failed</th><td>{}</td></tr>",
        s.reload_failures.load(Ordering::Relaxed),
        s.cert_renewal_failures.load(Ordering::Relaxed)
            + s.provision_failures.load(Ordering::Relaxed),
    );
    let provisioning = s.provisioning.lock().ok().and_then(|p| p.clone());
    if let Some(p) = provisioning {
        let _ = writeln!(o, "<tr><th>provisioning</th><td>{}</td></tr>", escape(&p));
    }
    let rotation = s.last_rotation.lock().ok().and_then(|r| r.clone());
    if let Some(r) = rotation {
        let text = match &r.error {
            None => format!("{} {}", badge(true, "done"), escape(&r.done.join("; "))),
            Some(e) => format!(
                "{} {}{}",
                badge(false, "failed"),
                escape(e),
                if r.done.is_empty() {
                    String::new()
                } else {
                    format!(" (done before it: {})", escape(&r.done.join("; ")))
                }
            ),
        };
        let _ = writeln!(
            o,
            "<tr><th>last rotate --now</th><td>{} ({}): {text}</td></tr>",
            escape(&utc(r.at)),
            escape(&ago(now, r.at)),
        );
    }
    o.push_str("</table>\n</body></html>\n");
    o
}

fn routes(o: &mut String, s: &AppState, now: i64) {
    let routes = s
        .route_list
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let requests = s.proxy.requests_snapshot();
    let verdicts = s.proxy.upstreams_snapshot();
    let count = |route: &str, pred: &dyn Fn(u16) -> bool| -> u64 {
        requests
            .iter()
            .filter(|((r, st), _)| r == route && pred(*st))
            .map(|(_, n)| n)
            .sum()
    };
    let _ = writeln!(
        o,
        "<h2>Routes</h2>\n<p class=\"muted\">{} open sessions of {} allowed &middot; {} requests in flight</p>\n<table id=\"routes\"><tr><th>route</th><th>upstream</th><th>requests</th><th>errors (5xx)</th><th>upstream verdict</th><th>MCP audit</th></tr>",
        s.proxy.sessions_open(),
        s.max_sessions.load(Ordering::Relaxed),
        s.proxy.requests_in_flight(),
    );
    for r in &routes {
        let (ok, verdict) = verdict_text(verdicts.get(&r.name), now);
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td><code>{}</code>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.name),
            escape(&r.upstream.to_string()),
            if r.preserve_host {
                " (preserve_host)"
            } else {
                ""
            },
            count(&r.name, &|_| true),
            count(&r.name, &|st| st >= 500),
            badge(ok, &verdict),
            r.mcp.audit_label(),
        );
    }
    if routes.is_empty() {
        o.push_str("<tr><td colspan=\"6\" class=\"muted\">no routes configured</td></tr>\n");
    }
    let unmatched = count("", &|_| true);
    if unmatched > 0 {
        let _ = writeln!(
            o,
            "<tr><td class=\"muted\">(no route matched)</td><td></td><td class=\"n\">{unmatched}</td><td class=\"n\">{}</td><td></td><td></td></tr>",
            count("", &|st| st >= 500)
        );
    }
    o.push_str("</table>\n");
}

fn tunnel(o: &mut String, s: &AppState) {
    o.push_str("<h2>cloudflared</h2>\n<table id=\"cloudflared\">\n");
    let h = s.cloudflared_health();
    let Some(cf) = s.cloudflared.get() else {
        let text = if h == Health::Disabled {
            "disabled ([cloudflared] enabled = false): cloudflared runs elsewhere"
        } else {
            "not started yet"
        };
        let _ = writeln!(
            o,
            "<tr><th>state</th><td>{}</td></tr>\n</table>",
            escape(text)
        );
        return;
    };
    let connections = h.connections();
    let _ = writeln!(
        o,
        "<tr><th>state</th><td>{}</td></tr>\n<tr><th>edge connections</th><td>{connections} of {EXPECTED_CONNECTIONS}</td></tr>\n<tr><th>restarts since start</th><td>{}</td></tr>",
        badge(matches!(h, Health::Connected(_)), h.name()),
        cf.restarts.load(Ordering::Relaxed),
    );
    if cf.crash_loop.load(Ordering::Relaxed) {
        let _ = writeln!(
            o,
            "<tr><th>crash loop</th><td>{}</td></tr>",
            badge(false, "restarting too often")
        );
    }
    let pid = cf.pid.load(Ordering::Relaxed);
    if pid != 0 {
        let _ = writeln!(o, "<tr><th>pid</th><td>{pid}</td></tr>");
    }
    if let Some(p) = cf.last_problem() {
        let _ = writeln!(o, "<tr><th>last problem</th><td>{}</td></tr>", escape(&p));
    }
    o.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn page_shows_routes_verdicts_and_escapes_errors() {
        let s = AppState::new(Arc::default(), false);
        s.listener_bound.store(true, Ordering::Relaxed);
        s.cert_not_after.store(1000 + 20 * 86400, Ordering::Relaxed);
        s.max_sessions.store(16, Ordering::Relaxed);
        let route = crate::config::Route {
            name: "echo".into(),
            upstream: crate::config::Upstream::parse("http://10.0.0.5:9000").unwrap(),
            preserve_host: false,
            mcp: Default::default(),
        };
        let audited = crate::config::Route {
            name: "files".into(),
            mcp: crate::config::RouteMcp {
                inspect: true,
                ..Default::default()
            },
            ..route.clone()
        };
        *s.route_list.lock().unwrap() = vec![Arc::new(route), Arc::new(audited)];
        s.proxy.request("echo", 200);
        s.proxy.request("echo", 502);
        *s.last_reload.lock().unwrap() = Some(super::super::metrics::LastReload {
            at: 990,
            error: Some("routes.<x>: bad & wrong".into()),
        });
        let page = render(&s, 1000);
        assert!(page.contains("<td>echo</td>"), "{page}");
        assert!(page.contains("http://10.0.0.5:9000"), "{page}");
        assert!(page.contains("no request forwarded yet"), "{page}");
        assert!(page.contains("20 days left"), "{page}");
        assert!(page.contains("routes.&lt;x&gt;: bad &amp; wrong"), "{page}");
        assert!(!page.contains("<x>"), "{page}");
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("disabled ([cloudflared] enabled = false)"));
        // Which routes leave no audit trail (issue 24, until inspection is the default).
        assert!(page.contains("<th>MCP audit</th>"), "{page}");
        assert!(page.contains("</td><td>not audited</td></tr>"), "{page}");
        assert!(page.contains("</td><td>audited</td></tr>"), "{page}");
        let status = crate::telemetry::admin::status_json(&s, 1000);
        assert_eq!(status["not_audited"], serde_json::json!(["echo"]));
        let text =
            crate::telemetry::status::summary("127.0.0.1:9".parse().unwrap(), &status.to_string());
        assert!(
            text.contains("not audited (MCP traffic forwarded unread, no audit line): echo\n"),
            "{text}"
        );
    }
}

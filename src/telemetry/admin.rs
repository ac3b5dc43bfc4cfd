//! The admin endpoint (`[admin] listen_addr`, loopback by default): `/` (the status page for a
//! browser), `/healthz` (the process answers), `/readyz` (JSON per component, 200/503),
//! `/metrics` (Prometheus text), `/status` (JSON: readiness plus the facts `mcp-tunnel status`
//! and `doctor` print).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::{self, AppState};
use super::page;

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn respond(state: &AppState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET" | "HEAD", "/") => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            page::render(state, now()),
        ),
        ("GET" | "HEAD", "/healthz") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_string(),
        ),
        ("GET" | "HEAD", "/readyz") => {
            let (ready, body) = metrics::readyz(state, now());
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, "application/json", body)
        }
        ("GET" | "HEAD", "/status") => {
            let body = status_json(state, now());
            let code = if body["ready"] == true {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, "application/json", format!("{body}\n"))
        }
        ("GET" | "HEAD", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(state, now()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /, /healthz, /readyz, /status or /metrics\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    // The page loads nothing and runs nothing: say so to the browser.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The `/status` document at `now` (unix seconds): readiness per component, the listener's
/// bound address, config generation and the last refused reload, certificate expiry,
/// cloudflared (version, connector ID, connections, restarts, last problem), the watchdog,
/// and request counts in total and per route (`errors` are 5xx answers; route "" is
/// requests that matched no route).
pub fn status_json(s: &AppState, now: i64) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let components = metrics::readiness(s, now);
    let ready = components.iter().all(|c| c.ready);
    let mut routes: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut total = 0;
    for ((route, status), n) in s.proxy.requests_snapshot() {
        let e = routes.entry(route).or_default();
        e.0 += n;
        if status >= 500 {
            e.1 += n;
        }
        total += n;
    }
    let routes: Vec<_> = routes
        .into_iter()
        .map(|(route, (requests, errors))| {
            serde_json::json!({ "route": route, "requests": requests, "errors": errors })
        })
        .collect();
    let refused: u64 = s.proxy.refusals_snapshot().iter().map(|(_, n)| n).sum();
    let na = s.cert_not_after.load(Relaxed);
    let h = s.cloudflared_health();
    let cf = s.cloudflared.get();
    let watchdog = s.watchdog_usec.load(Relaxed);
    serde_json::json!({
        "ready": ready,
        "severed": s.severed(),
        "components": components,
        "not_audited": s
            .route_list
            .lock()
            .map(|routes| {
                routes
                    .iter()
                    .filter(|r| !r.mcp.active())
                    .map(|r| r.name.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
        "listen_addr": s.listen_addr.get().map(|a| a.to_string()),
        "config": {
            "generation": s.config_generation.load(Relaxed),
            "reload_failures": s.reload_failures.load(Relaxed),
            "last_reload_error": s.last_reload_error.lock().ok().and_then(|e| e.clone()),
            "restart_required": s.restart_required.lock().map(|f| f.clone()).unwrap_or_default(),
        },
        "certificate": {
            "not_after": (na != 0).then_some(na),
            "days_left": (na != 0).then(|| (na - now).div_euclid(86400)),
        },
        "cloudflared": {
            "enabled": s.cloudflared_enabled,
            "state": h.name(),
            "connections": h.connections(),
            "expected_connections": crate::cloudflared::policy::EXPECTED_CONNECTIONS,
            "version": cf.and_then(|c| c.version()),
            "connector_id": cf.and_then(|c| c.connector_id()),
            "restarts": cf.map_or(0, |c| c.restarts.load(Relaxed)),
            "pid": cf.map(|c| c.pid.load(Relaxed)).filter(|p| *p != 0),
            "replacements": cf.map_or(0, |c| c.replacements.load(Relaxed)),
            "replacements_failed": cf.map_or(0, |c| c.replacements_failed.load(Relaxed)),
            "crash_loop": cf.is_some_and(|c| c.crash_loop.load(Relaxed)),
            "last_problem": cf.and_then(|c| c.last_problem()),
        },
        "rotation": {
            "enabled": s.rotation_enabled.load(Relaxed),
            "last": s.last_rotation.lock().ok().and_then(|r| r.clone()),
        },
        "watchdog_usec": (watchdog != 0).then_some(watchdog),
        "peer_check": s.peer_check.get().map(|p| {
            let refused = s.proxy.peer_refusals_snapshot();
            let n = |r: crate::proxy::metrics::PeerRefusal| {
                refused.iter().find(|(k, _)| *k == r).map_or(0, |(_, n)| *n)
            };
            serde_json::json!({
                "on": p.on,
                "state": p.state,
                "refused_other_user": n(crate::proxy::metrics::PeerRefusal::OtherUser),
                "refused_unknown_owner": n(crate::proxy::metrics::PeerRefusal::UnknownOwner),
            })
        }),
        "requests": {
            "total": total,
            "refused": refused,
            "sessions_open": s.proxy.sessions_open(),
            "in_flight": s.proxy.requests_in_flight(),
        },
        "routes": routes,
    })
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let mut backoff = super::limiter::AcceptBackoff::default();
    let log = super::limiter::LogLimiter::default();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => {
                    backoff.accepted();
                    a
                }
                Err(e) => {
                    // Out of descriptors, most likely: the connection waits in the backlog.
                    let wait = backoff.failed();
                    if let Some(suppressed) = log.permit() {
                        warn!(error = %e, suppressed, retry_in = ?wait, "admin accept failed");
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => { conn.as_mut().graceful_shutdown(); conn.await }
            };
            if let Err(e) = r {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

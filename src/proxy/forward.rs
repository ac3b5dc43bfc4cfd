//! One request inside a tunnel session: route, check, forward, stream back.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{info, warn};

use super::metrics::Refusal;
use super::upstream::{ConnectError, find_connect_error};
use super::{Proxy, text_response};
use crate::config::Route;

/// Response body: the upstream's, streamed, or a short one of the proxy's own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Per-session facts every request of the session shares.
pub struct Session {
    pub proxy: Arc<Proxy>,
    /// Server name the client asked for in the inner TLS handshake.
    pub sni: Option<String>,
    /// The caller as cloudflared reports it (`Cf-Connecting-Ip`), else the TCP peer.
    pub client_ip: IpAddr,
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn own(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    text_response(status, body).map(Either::Right)
}

impl Session {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let metrics = self.proxy.metrics.clone();
        let _in_flight = metrics.in_flight();
        let Some(host) = request_host(&req) else {
            metrics.refusal(Refusal::BadRequest);
            metrics.request("", 400);
            return Ok(own(StatusCode::BAD_REQUEST, "Missing Host header\n"));
        };
        let snapshot = self.proxy.snapshot.load_full();
        let Some(route) = snapshot.routes.lookup(&host).cloned() else {
            info!(%host, method = %req.method(), path = req.uri().path(), "no route for host");
            metrics.refusal(Refusal::NoRoute);
            metrics.request("", 502);
            return Ok(own(
                StatusCode::BAD_GATEWAY,
                "No route configured for host\n",
            ));
        };
        // SNI that names another route is a misdirected request (the session was set up
        // for a different upstream); SNI naming no route (the bare domain) does not pin one.
        if let Some(sni) = &self.sni
            && let Some(sni_route) = snapshot.routes.lookup(sni)
            && sni_route.name != route.name
        {
            info!(%host, %sni, "misdirected request: TLS server name and Host select different routes");
            metrics.refusal(Refusal::Misdirected);
            metrics.request(&route.name, 421);
            return Ok(own(
                StatusCode::MISDIRECTED_REQUEST,
                "Misdirected request: the TLS server name and the Host header name different routes\n",
            ));
        }
        if req.method() == Method::CONNECT {
            metrics.refusal(Refusal::BadRequest);
            metrics.request(&route.name, 405);
            return Ok(own(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported\n",
            ));
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        info!(route = %route.name, %method, %path, "request started");

        let upstream_req = self.upstream_request(req, &route, &host);
        let sent = tokio::time::timeout(
            snapshot.response_header_timeout,
            self.proxy.client.request(upstream_req),
        )
        .await;
        let resp = match sent {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                resp.map(Either::Left)
            }
            Ok(Err(e)) => {
                let (resp, why) = error_response(&route, &e);
                metrics.refusal(why);
                resp
            }
            Err(_) => {
                metrics.refusal(Refusal::ResponseTimeout);
                warn!(route = %route.name, upstream = %route.upstream, after = ?snapshot.response_header_timeout, "upstream response header timeout");
                own(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Upstream did not answer in time\n",
                )
            }
        };
        info!(
            route = %route.name,
            %method,
            %path,
            status = resp.status().as_u16(),
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "request completed"
        );
        metrics.request(&route.name, resp.status().as_u16());
        Ok(resp)
    }

    fn upstream_request(
        &self,
        req: Request<Incoming>,
        route: &Route,
        host: &str,
    ) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let authority = route.upstream.authority();
        parts.uri = Uri::builder()
            .scheme(route.upstream.scheme.as_str())
            .authority(authority.as_str())
            .path_and_query(path_and_query)
            .build()
            .expect("validated upstream and an existing path form a URI");
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        let host_value = if route.preserve_host {
            host
        } else {
            authority.as_str()
        };
        if let Ok(v) = HeaderValue::from_str(host_value) {
            headers.insert(header::HOST, v);
        }
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", self.client_ip),
            None => self.client_ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), v);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        Request::from_parts(parts, body)
    }
}

/// The name the request is for: `:authority` (h2, absolute-form) or `Host` (HTTP/1.1).
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn error_response(
    route: &Route,
    err: &hyper_util::client::legacy::Error,
) -> (Response<ProxyBody>, Refusal) {
    let why = match find_connect_error(err) {
        Some(ConnectError::NotAllowed { .. }) => Refusal::IpNotAllowed,
        Some(ConnectError::Timeout { .. }) => Refusal::ConnectTimeout,
        Some(_) => Refusal::ConnectFailed,
        None => Refusal::UpstreamError,
    };
    let resp = match find_connect_error(err) {
        Some(e @ ConnectError::NotAllowed { host, .. }) => {
            warn!(route = %route.name, upstream_host = %host, "{e}");
            own(
                StatusCode::BAD_GATEWAY,
                "Upstream address not allowed: the upstream resolved outside upstream.allowed_ips\n",
            )
        }
        Some(e @ ConnectError::Timeout { .. }) => {
            warn!(route = %route.name, upstream = %route.upstream, error = %e, "upstream connect timeout");
            own(
                StatusCode::GATEWAY_TIMEOUT,
                "Upstream connection timed out\n",
            )
        }
        Some(e) => {
            warn!(route = %route.name, upstream = %route.upstream, error = %e, "upstream connection failed");
            own(StatusCode::BAD_GATEWAY, "Upstream connection failed\n")
        }
        None => {
            warn!(route = %route.name, upstream = %route.upstream, error = %err, source = ?std::error::Error::source(err), "upstream request failed");
            own(StatusCode::BAD_GATEWAY, "Upstream request failed\n")
        }
    };
    (resp, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("mcp-session-id", HeaderValue::from_static("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("mcp-session-id") && h.contains_key(header::AUTHORIZATION));
    }
}

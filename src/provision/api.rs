//! Tunnels API client (spec section 10) over hyper-util's client and rustls with ring, the
//! same crypto provider as the proxy, so the tree carries one TLS stack.
//!
//! Every request carries `anthropic-version` and `anthropic-beta`; the bearer token comes from
//! [`Credentials`] (a WIF exchange, re-done when the access token nears expiry, or a Tunnels
//! API key). Transient failures are retried with exponential backoff, but a request that is
//! not safe to repeat (creating a tunnel, registering a certificate, rotating the token) is
//! retried only when it provably never reached the server (connect failure, 429): a second
//! `POST /v1/tunnels` would allocate a second tunnel.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use super::wif::{self, Credentials};
use super::{ProvisionError, Secret};

pub const ANTHROPIC_VERSION: &str = "2023-06-01";
pub const ANTHROPIC_BETA: &str = "mcp-tunnels-2026-06-22";
/// One request, connect to last body byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often and how patiently to retry transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts over about 30 s: long enough to ride out a network blip or an API restart,
    /// short enough that an operator running `setup init` by hand gets an answer.
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(16),
        }
    }
}

/// Delay before retry number `retry` (1-based): base * 2^(retry-1), capped. Pure, so the
/// schedule is tested without sleeping.
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let factor = 1u32 << retry.saturating_sub(1).min(16);
    policy
        .base_delay
        .saturating_mul(factor)
        .min(policy.max_delay)
}

/// Whether a request may be sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// Reads, reveal, archive (repeating returns the record unchanged).
    Safe,
    /// Create, register, rotate: retried only when the server never saw the request.
    Unsafe,
}

/// `BetaTunnel`.
#[derive(Debug, Clone, Deserialize)]
pub struct Tunnel {
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    pub domain: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub archived_at: Option<String>,
}

/// `BetaTunnelToken`; `tunnel_token` is a credential and never printed.
#[derive(Debug, Clone, Deserialize)]
pub struct TunnelToken {
    pub id: String,
    pub tunnel_token: Secret,
}

/// `BetaTunnelCertificate`.
#[derive(Debug, Clone, Deserialize)]
pub struct TunnelCertificate {
    pub id: String,
    #[serde(default)]
    pub tunnel_id: Option<String>,
    pub fingerprint: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub archived_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Page<T> {
    data: Vec<T>,
    #[serde(default)]
    next_page: Option<String>,
}

/// The standard Anthropic error body: `{"type":"error","error":{"type","message"}}`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub error: Option<ErrorDetail>,
    #[serde(default)]
    pub request_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorDetail {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// A failed call before interpretation: the status and what the body said.
#[derive(Debug)]
pub(super) struct Failure {
    pub status: StatusCode,
    pub kind: String,
    pub message: String,
    pub request_id: Option<String>,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A Tunnels API client bound to one base URL and one credential.
pub struct ApiClient {
    base: String,
    http: HttpClient,
    credentials: Credentials,
    workspace_id: Option<String>,
    retry: RetryPolicy,
    token: Mutex<Option<(Secret, Option<Instant>)>>,
}

impl ApiClient {
    /// `extra_roots` are trusted besides the system store (a private API gateway, or tests).
    pub fn new(
        base: &str,
        credentials: Credentials,
        workspace_id: Option<String>,
        retry: RetryPolicy,
        extra_roots: &[CertificateDer<'static>],
    ) -> ApiClient {
        let mut roots = RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        for cert in extra_roots {
            let _ = roots.add(cert.clone());
        }
        // hyper-rustls sets ALPN itself (enable_http1) and refuses a preset list.
        let tls = crate::proxy::tls::client_config(roots, Vec::new());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .build();
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            credentials,
            workspace_id,
            retry,
            token: Mutex::new(None),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The bearer token for the Tunnels API: the API key, or a WIF access token that is
    /// exchanged again (re-reading the identity token file) once it is within a minute of
    /// expiry.
    pub async fn access_token(&self) -> Result<Secret, ProvisionError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && until.is_none_or(|u| Instant::now() < u)
        {
            return Ok(token.clone());
        }
        let (token, until) = match &self.credentials {
            Credentials::ApiToken(t) => (t.clone(), None),
            Credentials::Wif(w) => {
                let exchanged = wif::exchange(self, w).await?;
                let margin = Duration::from_secs(60).min(exchanged.expires_in / 2);
                (
                    exchanged.access_token,
                    Some(Instant::now() + exchanged.expires_in.saturating_sub(margin)),
                )
            }
        };
        *cached = Some((token.clone(), until));
        Ok(token)
    }

    /// Forgets the access token, so that the next call exchanges again.
    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    pub async fn create_tunnel(&self) -> Result<Tunnel, ProvisionError> {
        self.call(
            Method::POST,
            "/v1/tunnels",
            Some(serde_json::json!({})),
            Repeat::Unsafe,
        )
        .await
    }

    pub async fn get_tunnel(&self, id: &str) -> Result<Tunnel, ProvisionError> {
        self.call(
            Method::GET,
            &format!("/v1/tunnels/{}", seg(id)),
            None,
            Repeat::Safe,
        )
        .await
    }

    /// Irreversible: the domain is retired, the token invalidated, every CA certificate
    /// archived. Safe to repeat: an archived tunnel's record comes back unchanged.
    pub async fn archive_tunnel(&self, id: &str) -> Result<Tunnel, ProvisionError> {
        self.call(
            Method::POST,
            &format!("/v1/tunnels/{}/archive", seg(id)),
            None,
            Repeat::Safe,
        )
        .await
    }

    pub async fn reveal_token(&self, id: &str) -> Result<TunnelToken, ProvisionError> {
        self.call(
            Method::POST,
            &format!("/v1/tunnels/{}/reveal_token", seg(id)),
            None,
            Repeat::Safe,
        )
        .await
    }

    pub async fn rotate_token(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<TunnelToken, ProvisionError> {
        self.call(
            Method::POST,
            &format!("/v1/tunnels/{}/rotate_token", seg(id)),
            Some(serde_json::json!({ "reason": reason })),
            Repeat::Unsafe,
        )
        .await
    }

    pub async fn register_certificate(
        &self,
        id: &str,
        ca_pem: &str,
    ) -> Result<TunnelCertificate, ProvisionError> {
        self.call(
            Method::POST,
            &format!("/v1/tunnels/{}/certificates", seg(id)),
            Some(serde_json::json!({ "ca_certificate_pem": ca_pem })),
            Repeat::Unsafe,
        )
        .await
    }

    /// Every non-archived certificate of a tunnel, following `next_page`.
    pub async fn active_certificates(
        &self,
        id: &str,
    ) -> Result<Vec<TunnelCertificate>, ProvisionError> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut path = format!("/v1/tunnels/{}/certificates?limit=1000", seg(id));
            if let Some(p) = &page {
                path.push_str("&page=");
                path.push_str(&seg(p));
            }
            let got: Page<TunnelCertificate> =
                self.call(Method::GET, &path, None, Repeat::Safe).await?;
            out.extend(got.data.into_iter().filter(|c| c.archived_at.is_none()));
            match got.next_page {
                Some(next) if Some(&next) != page.as_ref() => page = Some(next),
                _ => return Ok(out),
            }
        }
    }

    pub async fn archive_certificate(
        &self,
        id: &str,
        cert_id: &str,
    ) -> Result<TunnelCertificate, ProvisionError> {
        self.call(
            Method::POST,
            &format!(
                "/v1/tunnels/{}/certificates/{}/archive",
                seg(id),
                seg(cert_id)
            ),
            None,
            Repeat::Safe,
        )
        .await
    }

    /// One Tunnels API call with headers, bearer token, retries and error mapping.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        repeat: Repeat,
    ) -> Result<T, ProvisionError> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let mut reauthenticated = false;
        loop {
            let token = self.access_token().await?;
            let build = |req: http::request::Builder| {
                let mut req = req
                    .header(header::AUTHORIZATION, format!("Bearer {}", token.expose()))
                    .header("anthropic-version", ANTHROPIC_VERSION)
                    .header("anthropic-beta", ANTHROPIC_BETA);
                if let Some(w) = &self.workspace_id {
                    req = req.header("anthropic-workspace-id", w);
                }
                req
            };
            match self
                .send(method.clone(), path, body.clone(), repeat, build)
                .await
            {
                Ok(bytes) => {
                    return serde_json::from_slice(&bytes).map_err(|e| {
                        ProvisionError::Protocol(format!(
                            "{method} {path}: unexpected response body: {e}"
                        ))
                    });
                }
                // An access token can expire between the exchange and its use: exchange once
                // more before reporting a 401.
                Err(Sent::Status(f))
                    if f.status == StatusCode::UNAUTHORIZED
                        && !reauthenticated
                        && matches!(self.credentials, Credentials::Wif(_)) =>
                {
                    reauthenticated = true;
                    self.forget_token().await;
                }
                Err(Sent::Status(f)) => {
                    return Err(super::api_error(&method, path, f, &self.credentials));
                }
                Err(Sent::Unreachable(e)) => return Err(e),
            }
        }
    }

    /// Sends one request with retries; returns the body of a 2xx answer.
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        repeat: Repeat,
        decorate: impl Fn(http::request::Builder) -> http::request::Builder,
    ) -> Result<Bytes, Sent> {
        let url = format!("{}{}", self.base, path);
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = decorate(Request::builder().method(method.clone()).uri(&url));
            if body.is_some() {
                req = req.header(header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|e| {
                    Sent::Unreachable(ProvisionError::Config(format!(
                        "bad request URL {url}: {e}"
                    )))
                })?;
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let resp = self.http.request(req).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
            })
            .await;
            let (retryable, problem) = match outcome {
                Ok(Ok((status, bytes))) if status.is_success() => {
                    debug!(%method, path, %status, "tunnels api call");
                    return Ok(bytes);
                }
                Ok(Ok((status, bytes))) => {
                    let failure = parse_failure(status, &bytes);
                    let transient = status == StatusCode::TOO_MANY_REQUESTS
                        || (repeat == Repeat::Safe && status.is_server_error());
                    if !transient || attempt >= self.retry.attempts {
                        return Err(Sent::Status(failure));
                    }
                    (true, format!("HTTP {status}: {}", failure.message))
                }
                Ok(Err(e)) => {
                    let connect = e
                        .downcast_ref::<hyper_util::client::legacy::Error>()
                        .is_some_and(|e| e.is_connect());
                    (connect || repeat == Repeat::Safe, error_chain(&*e))
                }
                Err(_) => (
                    repeat == Repeat::Safe,
                    format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                ),
            };
            if !retryable || attempt >= self.retry.attempts {
                return Err(Sent::Unreachable(ProvisionError::Unreachable {
                    url: format!("{method} {url}"),
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    last: problem,
                }));
            }
            let delay = backoff(&self.retry, attempt);
            warn!(%method, path, attempt, error = %problem, retry_in = ?delay, "tunnels api call failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Why [`ApiClient::send`] gave up.
pub(super) enum Sent {
    Status(Failure),
    Unreachable(ProvisionError),
}

/// Reads an error body in the standard Anthropic shape, or the OAuth (RFC 6749) shape
/// `{"error": "invalid_grant", "error_description": ...}` that the token endpoint may use.
fn parse_failure(status: StatusCode, bytes: &[u8]) -> Failure {
    #[derive(Deserialize)]
    struct OAuth {
        error: String,
        #[serde(default)]
        error_description: String,
    }
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(bytes)
        && let Some(e) = b.error
    {
        return Failure {
            status,
            kind: e.kind,
            message: e.message,
            request_id: b.request_id,
        };
    }
    if let Ok(o) = serde_json::from_slice::<OAuth>(bytes) {
        return Failure {
            status,
            kind: o.error,
            message: o.error_description,
            request_id: None,
        };
    }
    Failure {
        status,
        kind: String::new(),
        message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        request_id: None,
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Percent-encodes an ID for use as one path segment (IDs are `[A-Za-z0-9_]` in practice;
/// this keeps a stray `/` or `?` from a config file from changing the request).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let p = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(4),
        };
        let got: Vec<u64> = (1..=6).map(|r| backoff(&p, r).as_millis() as u64).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(backoff(&p, 60), Duration::from_secs(4));
    }

    #[test]
    fn error_bodies_in_both_shapes() {
        let f = parse_failure(
            StatusCode::FORBIDDEN,
            br#"{"type":"error","error":{"type":"permission_error","message":"nope"},"request_id":"req_1"}"#,
        );
        assert_eq!(
            (f.kind.as_str(), f.message.as_str(), f.request_id.as_deref()),
            ("permission_error", "nope", Some("req_1"))
        );
        let f = parse_failure(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"expired"}"#,
        );
        assert_eq!(
            (f.kind.as_str(), f.message.as_str()),
            ("invalid_grant", "expired")
        );
        let f = parse_failure(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!((f.kind.as_str(), f.message.as_str()), ("", "<html>"));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("tnl_01Hx"), "tnl_01Hx");
        assert_eq!(seg("a/b?c"), "a%2Fb%3Fc");
    }
}

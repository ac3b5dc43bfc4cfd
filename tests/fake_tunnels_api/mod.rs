//! A local Tunnels API for the tests, following spec sections 10 and 11: the documented
//! endpoints and objects, header and bearer checks, the jwt-bearer token exchange, the CA
//! rules of section 9.4, the two-active-certificates cap, archive semantics, and errors in
//! the standard shape `{"type":"error","error":{"type","message"},"request_id"}` (the token
//! endpoint answers OAuth errors as RFC 6749 does: `{"error","error_description"}`).
//!
//! It does not verify JWT signatures: an assertion is accepted when the test listed it.

#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const VERSION: &str = "2023-06-01";
pub const BETA: &str = "mcp-tunnels-2026-06-22";
pub const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[derive(Debug, Clone)]
pub struct TunnelRec {
    pub id: String,
    pub domain: String,
    pub created_at: String,
    pub archived_at: Option<String>,
    pub token: String,
    pub token_id: String,
}

#[derive(Debug, Clone)]
pub struct CertRec {
    pub id: String,
    pub tunnel_id: String,
    pub pem: String,
    pub fingerprint: String,
    pub created_at: String,
    pub expires_at: String,
    pub archived_at: Option<String>,
    seq: u64,
}

/// Everything the server knows; tests read and tweak it through [`Fake::with`].
#[derive(Default)]
pub struct State {
    // Behaviour knobs.
    pub accepted_assertions: HashSet<String>,
    pub api_keys: HashSet<String>,
    pub federation_rule_id: String,
    pub organization_id: String,
    /// False: the rule lacks workspace:manage_tunnels, so the Tunnels API answers 403.
    pub manage_tunnels_scope: bool,
    pub expires_in: u64,
    /// Answer the next N Tunnels API requests with 503.
    pub fail_next: u32,
    // Data.
    pub tunnels: Vec<TunnelRec>,
    pub certs: Vec<CertRec>,
    pub access_tokens: Vec<String>,
    // Observations.
    pub exchanges: u32,
    pub assertions_seen: Vec<String>,
    pub tunnels_created: u32,
    pub certs_registered: u32,
    pub rotations: u32,
    pub max_active: usize,
    pub log: Vec<String>,
    seq: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn random(&mut self, n: usize) -> String {
        let mut b = vec![0u8; n];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// A token in cloudflared's format (base64 of `{"a","t","s"}`, `t` a UUID), so the
    /// cloudflared stand-in accepts it.
    pub fn cloudflared_token(&mut self) -> String {
        use base64::Engine;
        let h = self.random(16);
        let uuid = format!(
            "{}-{}-4{}-8{}-{}",
            &h[..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        );
        let secret = base64::engine::general_purpose::STANDARD.encode(self.random(16));
        base64::engine::general_purpose::STANDARD.encode(format!(
            r#"{{"a":"acct-{}","t":"{uuid}","s":"{secret}"}}"#,
            self.random(4)
        ))
    }

    /// A JWT-shaped identity assertion for `sub`, valid for an hour, accepted from now on
    /// (the fake checks the set of accepted assertions, not signatures).
    pub fn accept_assertion(&mut self, sub: &str) -> String {
        use base64::Engine;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let b = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.{}",
            b(r#"{"alg":"ES256","kid":"k1"}"#.into()),
            b(format!(
                r#"{{"iss":"https://idp.example","aud":"api.anthropic.com","sub":"{sub}","iat":{},"exp":{}}}"#,
                now - 60,
                now + 3600
            )),
            b(format!("signature-of-{sub}"))
        );
        self.accepted_assertions.insert(jwt.clone());
        jwt
    }

    /// Creates a tunnel directly (as the Console would).
    pub fn create_tunnel(&mut self) -> TunnelRec {
        let n = self.next();
        let rec = TunnelRec {
            id: format!("tnl_{n:04}{}", self.random(8)),
            domain: format!("{}.tunnel.anthropic.com", self.random(4)),
            created_at: now_rfc3339(),
            archived_at: None,
            token: self.cloudflared_token(),
            token_id: format!("tkn_{}", self.random(6)),
        };
        self.tunnels.push(rec.clone());
        rec
    }

    pub fn active_certs(&self, tunnel_id: &str) -> Vec<&CertRec> {
        self.certs
            .iter()
            .filter(|c| c.tunnel_id == tunnel_id && c.archived_at.is_none())
            .collect()
    }

    /// Registers a CA directly, with the same checks as the endpoint.
    pub fn register(&mut self, tunnel_id: &str, pem: &str) -> Result<CertRec, String> {
        let (fingerprint, expires_at) = check_ca(pem)?;
        if self.active_certs(tunnel_id).len() >= 2 {
            return Err(CAP_MESSAGE.into());
        }
        let seq = self.next();
        let rec = CertRec {
            id: format!("tcrt_{seq:04}{}", self.random(8)),
            tunnel_id: tunnel_id.into(),
            pem: pem.into(),
            fingerprint,
            created_at: now_rfc3339(),
            expires_at,
            archived_at: None,
            seq,
        };
        self.certs.push(rec.clone());
        self.certs_registered += 1;
        self.max_active = self.max_active.max(self.active_certs(tunnel_id).len());
        Ok(rec)
    }

    /// Every credential the server handed out or accepted, to search logs for.
    pub fn secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = self.access_tokens.clone();
        out.extend(self.tunnels.iter().map(|t| t.token.clone()));
        out.extend(self.assertions_seen.iter().cloned());
        out.extend(self.accepted_assertions.iter().cloned());
        out.extend(self.api_keys.iter().cloned());
        // An archived tunnel's token is cleared: an empty string is no secret to look for.
        out.retain(|s| !s.is_empty());
        out
    }
}

pub const CAP_MESSAGE: &str =
    "Tunnel already has the maximum of 2 non-archived certificates; archive one first";

/// A running fake.
pub struct Fake {
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            federation_rule_id: "fdrl_test".into(),
            organization_id: "00000000-0000-0000-0000-000000000001".into(),
            manage_tunnels_scope: true,
            expires_in: 3600,
            ..Default::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake {
            addr,
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// Runs `f` on the server state.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// PEMs of the tunnel's active CAs: the trust set Anthropic's backend uses right now.
    pub fn trusted_pems(&self, tunnel_id: &str) -> Vec<String> {
        self.with(|s| {
            s.active_certs(tunnel_id)
                .iter()
                .map(|c| c.pem.clone())
                .collect()
        })
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("request-id", "req_fake")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The standard Anthropic error shape.
fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake0001"}),
    )
}

fn oauth_error(code: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": code, "error_description": description}),
    )
}

fn tunnel_json(t: &TunnelRec) -> Value {
    json!({"id": t.id, "type": "tunnel", "display_name": null, "domain": t.domain,
           "created_at": t.created_at, "archived_at": t.archived_at})
}

fn cert_json(c: &CertRec) -> Value {
    json!({"id": c.id, "type": "tunnel_certificate", "tunnel_id": c.tunnel_id,
           "fingerprint": c.fingerprint, "created_at": c.created_at,
           "expires_at": c.expires_at, "archived_at": c.archived_at})
}

fn token_json(t: &TunnelRec) -> Value {
    json!({"id": t.token_id, "tunnel_token": t.token, "type": "tunnel_token"})
}

fn query(req_query: Option<&str>, key: &str) -> Option<String> {
    req_query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

async fn handle(st: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", "bad body"),
    };
    let path = parts.uri.path().to_string();
    let q = parts.uri.query();
    let mut s = st.lock().unwrap();
    s.log.push(format!("{} {}", parts.method, parts.uri));

    if path == "/v1/oauth/token" {
        if parts.method != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "POST only",
            );
        }
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return oauth_error("invalid_request", "body must be JSON");
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        for k in [
            "grant_type",
            "assertion",
            "federation_rule_id",
            "organization_id",
        ] {
            if field(k).is_none() {
                return oauth_error("invalid_request", &format!("missing {k}"));
            }
        }
        if field("grant_type").as_deref() != Some(GRANT) {
            return oauth_error("unsupported_grant_type", "expected jwt-bearer");
        }
        let assertion = field("assertion").unwrap();
        s.exchanges += 1;
        s.assertions_seen.push(assertion.clone());
        if field("federation_rule_id") != Some(s.federation_rule_id.clone())
            || field("organization_id") != Some(s.organization_id.clone())
            || !s.accepted_assertions.contains(&assertion)
        {
            return oauth_error("invalid_grant", "The assertion could not be validated");
        }
        let token = format!("sk-ant-oat01-{}", s.random(20));
        s.access_tokens.push(token.clone());
        let expires_in = s.expires_in;
        return json_response(
            StatusCode::OK,
            json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in,
                   "scope": "workspace:manage_tunnels"}),
        );
    }

    // Tunnels API: headers, then bearer, then scope.
    let header = |k: &str| parts.headers.get(k).and_then(|v| v.to_str().ok());
    if header("anthropic-version") != Some(VERSION) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    if !header("anthropic-beta").is_some_and(|b| b.split(',').any(|x| x.trim() == BETA)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "this endpoint requires anthropic-beta: mcp-tunnels-2026-06-22",
        );
    }
    let bearer = header("authorization").and_then(|a| a.strip_prefix("Bearer "));
    let authorized =
        bearer.is_some_and(|b| s.access_tokens.iter().any(|t| t == b) || s.api_keys.contains(b));
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid bearer token",
        );
    }
    if !s.manage_tunnels_scope {
        return error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "token lacks workspace:manage_tunnels",
        );
    }
    if parts.method == Method::POST
        && !body.is_empty()
        && header("content-type") != Some("application/json")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Content-Type must be application/json",
        );
    }
    if s.fail_next > 0 {
        s.fail_next -= 1;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            "try again",
        );
    }
    let body_json: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "body must be JSON",
                );
            }
        }
    };

    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let m = &parts.method;
    match (m, segs.as_slice()) {
        (&Method::POST, ["v1", "tunnels"]) => {
            if let Some(d) = body_json.get("display_name")
                && !d.as_str().is_some_and(|d| (1..=255).contains(&d.len()))
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "display_name: 1 to 255 characters",
                );
            }
            s.tunnels_created += 1;
            let t = s.create_tunnel();
            json_response(StatusCode::OK, tunnel_json(&t))
        }
        (&Method::GET, ["v1", "tunnels"]) => {
            let include = query(q, "include_archived").as_deref() == Some("true");
            let mut data: Vec<Value> = s
                .tunnels
                .iter()
                .rev()
                .filter(|t| include || t.archived_at.is_none())
                .map(tunnel_json)
                .collect();
            data.truncate(1000);
            json_response(StatusCode::OK, json!({"data": data, "next_page": null}))
        }
        (_, ["v1", "tunnels", id, rest @ ..]) => {
            let id = id.to_string();
            let Some(ti) = s.tunnels.iter().position(|t| t.id == id) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    &format!("tunnel {id} not found"),
                );
            };
            tunnel_op(&mut s, ti, m, rest, q, &body_json)
        }
        _ => error(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint"),
    }
}

fn tunnel_op(
    s: &mut State,
    ti: usize,
    m: &Method,
    rest: &[&str],
    q: Option<&str>,
    body: &Value,
) -> Response<Full<Bytes>> {
    let archived = s.tunnels[ti].archived_at.is_some();
    let tid = s.tunnels[ti].id.clone();
    match (m, rest) {
        (&Method::GET, []) => json_response(StatusCode::OK, tunnel_json(&s.tunnels[ti])),
        (&Method::POST, ["archive"]) => {
            if !archived {
                let now = now_rfc3339();
                s.tunnels[ti].archived_at = Some(now.clone());
                for c in s
                    .certs
                    .iter_mut()
                    .filter(|c| c.tunnel_id == tid && c.archived_at.is_none())
                {
                    c.archived_at = Some(now.clone());
                }
                s.tunnels[ti].token = String::new();
            }
            json_response(StatusCode::OK, tunnel_json(&s.tunnels[ti]))
        }
        (&Method::POST, ["reveal_token"]) if !archived => {
            json_response(StatusCode::OK, token_json(&s.tunnels[ti]))
        }
        (&Method::POST, ["rotate_token"]) if !archived => {
            s.rotations += 1;
            let token = s.cloudflared_token();
            let token_id = format!("tkn_{}", s.random(6));
            s.tunnels[ti].token = token;
            s.tunnels[ti].token_id = token_id;
            json_response(StatusCode::OK, token_json(&s.tunnels[ti]))
        }
        (&Method::POST, ["certificates"]) => {
            if archived {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "tunnel is archived",
                );
            }
            let Some(pem) = body.get("ca_certificate_pem").and_then(|p| p.as_str()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "ca_certificate_pem: required",
                );
            };
            match s.register(&tid, pem) {
                Ok(rec) => json_response(StatusCode::OK, cert_json(&rec)),
                Err(msg) => error(StatusCode::BAD_REQUEST, "invalid_request_error", &msg),
            }
        }
        (&Method::GET, ["certificates"]) => {
            let include = query(q, "include_archived").as_deref() == Some("true");
            let limit: usize = match query(q, "limit").map(|l| l.parse::<usize>()) {
                None => 20,
                Some(Ok(l)) if (1..=1000).contains(&l) => l,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "limit: 1 to 1000",
                    );
                }
            };
            let offset: usize = query(q, "page")
                .and_then(|p| p.strip_prefix("page_").and_then(|n| n.parse().ok()))
                .unwrap_or(0);
            let mut all: Vec<&CertRec> = s
                .certs
                .iter()
                .filter(|c| c.tunnel_id == tid && (include || c.archived_at.is_none()))
                .collect();
            all.sort_by_key(|c| std::cmp::Reverse(c.seq));
            let page: Vec<Value> = all
                .iter()
                .skip(offset)
                .take(limit)
                .map(|c| cert_json(c))
                .collect();
            let next = (offset + limit < all.len()).then(|| format!("page_{}", offset + limit));
            json_response(StatusCode::OK, json!({"data": page, "next_page": next}))
        }
        (&Method::GET, ["certificates", cid]) => {
            match s.certs.iter().find(|c| c.id == *cid && c.tunnel_id == tid) {
                Some(c) => json_response(StatusCode::OK, cert_json(c)),
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    "certificate not found",
                ),
            }
        }
        (&Method::POST, ["certificates", cid, "archive"]) => {
            match s
                .certs
                .iter_mut()
                .find(|c| c.id == *cid && c.tunnel_id == tid)
            {
                Some(c) => {
                    if c.archived_at.is_none() {
                        c.archived_at = Some(now_rfc3339());
                    }
                    let c = c.clone();
                    json_response(StatusCode::OK, cert_json(&c))
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    "certificate not found",
                ),
            }
        }
        (&Method::POST, ["reveal_token" | "rotate_token"]) => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "tunnel is archived",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint"),
    }
}

/// Section 9.4's CA rules; returns (fingerprint, expires_at).
pub fn check_ca(pem: &str) -> Result<(String, String), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::oid_registry as oids;
    use x509_parser::public_key::PublicKey;
    if pem.len() > 8 * 1024 {
        return Err("ca_certificate_pem: larger than 8 KB".into());
    }
    if pem.contains("PRIVATE KEY") {
        return Err("ca_certificate_pem: must not contain key material".into());
    }
    if pem.matches("-----BEGIN CERTIFICATE-----").count() != 1
        || pem.matches("-----BEGIN ").count() != 1
    {
        return Err("ca_certificate_pem: expected exactly one certificate".into());
    }
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("ca_certificate_pem: not PEM: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("ca_certificate_pem: not X.509: {e}"))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.critical && bc.value.ca => {}
        _ => return Err("BasicConstraints must be present, CA:TRUE, and critical".into()),
    }
    let has_ski = cert
        .extensions()
        .iter()
        .any(|e| e.oid == oids::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER);
    if !has_ski {
        return Err("SubjectKeyIdentifier is required".into());
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        _ => return Err("KeyUsage must include keyCertSign".into()),
    }
    if !cert.validity().is_valid() {
        return Err("certificate is outside its validity period".into());
    }
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(ec)) if ec.key_size() >= 256 => {}
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => {}
        _ => return Err("key must be RSA >= 2048 bits or ECDSA >= P-256".into()),
    }
    let sig = &cert.signature_algorithm.algorithm;
    let strong = [
        oids::OID_SIG_ECDSA_WITH_SHA256,
        oids::OID_SIG_ECDSA_WITH_SHA384,
        oids::OID_SIG_ECDSA_WITH_SHA512,
        oids::OID_PKCS1_SHA256WITHRSA,
        oids::OID_PKCS1_SHA384WITHRSA,
        oids::OID_PKCS1_SHA512WITHRSA,
    ];
    if !strong.contains(sig) {
        return Err("signature must be SHA-256 or stronger".into());
    }
    let fp: String = ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expires = std::time::SystemTime::from(cert.validity().not_after.to_datetime());
    Ok((fp, humantime::format_rfc3339_seconds(expires).to_string()))
}

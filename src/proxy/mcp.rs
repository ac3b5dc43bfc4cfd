//! MCP inspection on the request path, for routes with `inspect = true` or a tool policy
//! (`config::RouteMcp::active`); other routes never reach this module.
//!
//! - Request: without a policy the body streams upstream as it arrives and a copy (up to
//!   `mcp.max_inspect_bytes`) is read when it ends (`TeeBody`). With a policy the decision
//!   needs the whole body first: it is read up to the bound, judged, then forwarded whole or
//!   answered by the proxy; what cannot be read is refused (fail closed).
//! - Response: JSON bodies and SSE events are read for each request's outcome
//!   (`ResponseInspector`). With a policy, SSE events pass event by event (each held only
//!   until its blank line) and `tools/list` results are rewritten without the hidden tools;
//!   a JSON body is held whole only when its request asked for `tools/list`.
//! - Every client message ends in one audit line (target `mcp_audit`) and its metrics, when
//!   its answer is seen or, at the latest, when the exchange ends (`Exchange`'s `Drop`).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError};
use hyper::body::{Body, Frame, SizeHint};
use tracing::{info, warn};

use super::metrics::{LimitHit, ProxyMetrics};
use crate::config::{McpConfig, Route};
use crate::mcp::headers::{self, HEADER_MISMATCH_CODE, Mismatch};
use crate::mcp::jsonrpc::{self, Name, bounded};
use crate::mcp::policy::{self, Decision, Denial, Policy};
use crate::mcp::{Id, Kind, Message, Options, Outcome, Parsed, method_label, sse};

/// Log target of the audit lines: `RUST_LOG=info,mcp_audit=off` silences them; in the
/// journal they carry `TARGET=mcp_audit`.
pub const AUDIT_TARGET: &str = "mcp_audit";

/// Audit records made (each one taken by the log subscriber): with the log pipeline's
/// counts of audit entries written and dropped, every record is accounted for
/// (`mcp_tunnel_audit_records_total`).
static AUDIT_RECORDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn audit_records() -> u64 {
    AUDIT_RECORDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one audit record about to be logged, if the subscriber takes it (`RUST_LOG` can
/// silence the target on purpose).
fn count_audit_record() {
    if tracing::enabled!(target: AUDIT_TARGET, tracing::Level::INFO) {
        AUDIT_RECORDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What `request` needs from the proxy.
pub struct Scope<'a> {
    pub route: &'a Arc<Route>,
    pub config: &'a McpConfig,
    pub metrics: &'a Arc<ProxyMetrics>,
    pub caller: IpAddr,
}

/// The request, ready to go upstream, or the proxy's own answer.
pub enum Inspected<B> {
    Forward(Request<ForwardBody<B>>, Option<Arc<Exchange>>),
    Refused(Response<Full<Bytes>>),
}

/// A request body after inspection: as it was, streamed through a tee, or read whole.
pub type ForwardBody<B> =
    http_body_util::Either<B, http_body_util::Either<TeeBody<B>, Full<Bytes>>>;

/// Decides how an inspected route's request goes upstream.
pub async fn request<B>(scope: Scope<'_>, mut req: Request<B>) -> Inspected<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::Either::{Left, Right};
    let policy = scope.route.mcp.policy.as_ref();
    let is_post = req.method() == Method::POST;
    let policy_get = policy.is_some() && req.method() == Method::GET;
    if !is_post && !policy_get {
        // DELETE, OPTIONS, ...: no JSON-RPC in them.
        return Inspected::Forward(req.map(Left), None);
    }
    // The proxy reads what it forwards: no compressed answers on inspected routes.
    req.headers_mut().insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let ex = Exchange::new(&scope, req.headers());
    if !is_post {
        // A GET stream (or its resumption) can carry responses, tools/list results included.
        ex.lock().stream_only = true;
        return Inspected::Forward(req.map(Left), Some(ex));
    }
    // Headers that mirror the body (MCP 2026-07-28) are checked against it before anything
    // goes upstream, so such a body is read whole first, as on a policy route.
    let mirrored = headers::present(req.headers());
    let unreadable = if !is_json(req.headers()) {
        Some("request_not_json")
    } else if is_encoded(req.headers()) {
        Some("request_compressed")
    } else {
        None
    };
    match (policy, unreadable) {
        (Some(_), Some(reason)) => Inspected::Refused(ex.refuse(
            reason,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            policy::INVALID_REQUEST_CODE,
            "The tunnel's policy for this server only forwards uncompressed application/json JSON-RPC POSTs",
        )),
        (None, Some(reason)) if mirrored => Inspected::Refused(ex.refuse(
            reason,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HEADER_MISMATCH_CODE,
            "Header mismatch: the tunnel checks MCP request headers against the body, and only reads uncompressed application/json bodies",
        )),
        (None, Some(reason)) => {
            ex.lock().request_uninspected = Some(reason);
            Inspected::Forward(req.map(Left), None)
        }
        (None, None) if !mirrored => {
            let max = ex.max_bytes;
            let args = scope.route.mcp.log_argument_names;
            Inspected::Forward(
                req.map(|b| Right(Left(TeeBody::new(b, max, args, ex.clone())))),
                Some(ex),
            )
        }
        (policy, None) => gate(ex, policy, req).await,
    }
}

/// The path of a body that must be judged before it goes: read it whole (bounded), check
/// its mirrored headers and the route's policy, forward it or answer.
async fn gate<B>(ex: Arc<Exchange>, policy: Option<&Policy>, req: Request<B>) -> Inspected<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, mut body) = req.into_parts();
    let max = ex.max_bytes;
    if body.size_hint().lower() > max as u64 {
        if policy.is_none() {
            // Only mirrored headers brought it here, and there is no policy whose verdict
            // they could contradict: a large body passes uninspected, as on any inspected
            // route, instead of being refused.
            ex.request_uninspected("request_too_large");
            let req = Request::from_parts(parts, body);
            return Inspected::Forward(req.map(http_body_util::Either::Left), None);
        }
        return Inspected::Refused(ex.too_large());
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(d) = frame.data_ref() {
                    if buf.len() + d.len() > max {
                        return Inspected::Refused(ex.too_large());
                    }
                    buf.extend_from_slice(d);
                }
            }
            Err(e) => {
                let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                if e.is::<LengthLimitError>() {
                    ex.metrics.limit(LimitHit::RequestBodyTooLarge);
                    return Inspected::Refused(ex.refuse(
                        "request_over_limit",
                        StatusCode::PAYLOAD_TOO_LARGE,
                        policy::INVALID_REQUEST_CODE,
                        "Request body too large (limits.max_request_body_bytes)",
                    ));
                }
                return Inspected::Refused(ex.refuse(
                    "request_incomplete",
                    StatusCode::BAD_REQUEST,
                    policy::INVALID_REQUEST_CODE,
                    "The request body could not be read",
                ));
            }
        }
    }
    let opts = Options {
        arg_names: ex.route.mcp.log_argument_names,
    };
    let parsed = match jsonrpc::parse(&buf, opts) {
        Ok(p) => p,
        Err(_) => {
            return Inspected::Refused(ex.refuse(
                "request_not_json",
                StatusCode::BAD_REQUEST,
                policy::PARSE_ERROR_CODE,
                "Parse error: the tunnel's policy for this server only forwards JSON-RPC it can read",
            ));
        }
    };
    if let Err(mismatch) = headers::check(&parts.headers, &parsed) {
        return Inspected::Refused(ex.mismatch(&parsed, &mismatch));
    }
    match policy.map_or(Decision::Forward, |p| p.decide(&parsed)) {
        Decision::Forward => {
            ex.expect(&parsed);
            let req = Request::from_parts(parts, Full::new(Bytes::from(buf)));
            use http_body_util::Either::Right;
            Inspected::Forward(req.map(|b| Right(Right(b))), Some(ex))
        }
        Decision::Refuse(denials) => {
            ex.deny(&parsed, &denials);
            let resp = match policy::refusal_body(&parsed, &denials) {
                Some(body) => json_response(StatusCode::OK, body),
                // Only notifications or responses: nothing to answer, but not accepted.
                None => {
                    let (code, message) = denials[0].error();
                    json_response(StatusCode::FORBIDDEN, error_body(&Id::Null, code, &message))
                }
            };
            Inspected::Refused(resp)
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

fn is_encoded(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.to_str()
            .map_or(true, |v| !v.trim().eq_ignore_ascii_case("identity"))
    })
}

fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(want))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_body(id: &Id, code: i64, message: &str) -> Vec<u8> {
    serde_json::to_vec(&policy::error_response(id, code, message)).unwrap_or_default()
}

// ----------------------------------------------------------------------------- exchange

/// One inspected HTTP exchange: the client messages waiting for their outcome. Shared by
/// the request tee and the response inspector; whatever is still waiting when the last of
/// them lets go is logged with the outcome the HTTP status gives it.
pub struct Exchange {
    route: Arc<Route>,
    caller: IpAddr,
    start: Instant,
    max_bytes: usize,
    max_tool_labels: usize,
    metrics: Arc<ProxyMetrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: Vec<Pending>,
    request_uninspected: Option<&'static str>,
    response_uninspected: Option<&'static str>,
    status: Option<u16>,
    session_id: Option<String>,
    protocol_version: Option<String>,
    /// The W3C trace id of the HTTP request (`traceparent`), for requests whose `_meta`
    /// carries none: with no session (2026-07-28) it and the JSON-RPC id correlate a line.
    trace_id: Option<String>,
    /// A GET stream: no client messages, only what the server sends.
    stream_only: bool,
}

/// A client message waiting for its outcome.
struct Pending {
    kind: Kind,
    id: Option<Id>,
    method_label: &'static str,
    /// For the log: the method, bounded.
    method: String,
    tool: Option<String>,
    arg_names: Option<Vec<String>>,
    /// From `params._meta.traceparent` (SEP-414).
    trace_id: Option<String>,
}

impl Pending {
    fn of(m: &Message) -> Pending {
        Pending {
            kind: m.kind(),
            id: m.id.clone(),
            method_label: method_label(m),
            method: match (m.method(), m.kind()) {
                (Some(method), _) => bounded(method),
                (None, Kind::Response) => "(response)".into(),
                (None, _) => "(invalid)".into(),
            },
            tool: m.tool().map(str::to_owned),
            arg_names: m.params.arg_names.clone(),
            trace_id: m.params.meta.traceparent.as_deref().and_then(trace_id),
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), or `None` when the
/// value is not one: a made-up value never reaches a log line.
fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, id, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(id, 32)
        && id.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then(|| id.to_ascii_lowercase())
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(bounded)
}

impl Exchange {
    fn new(scope: &Scope<'_>, headers: &HeaderMap) -> Arc<Exchange> {
        Arc::new(Exchange {
            route: scope.route.clone(),
            caller: scope.caller,
            start: Instant::now(),
            max_bytes: scope.config.max_inspect_bytes,
            max_tool_labels: scope.config.max_tool_labels,
            metrics: scope.metrics.clone(),
            state: Mutex::new(State {
                session_id: header_text(headers, "mcp-session-id"),
                protocol_version: header_text(headers, "mcp-protocol-version"),
                trace_id: headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .and_then(trace_id),
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn policy(&self) -> Option<&Policy> {
        self.route.mcp.policy.as_ref()
    }

    /// The HTTP status the client got (the proxy's own, or the upstream's).
    pub fn set_status(&self, status: StatusCode) {
        self.lock().status = Some(status.as_u16());
    }

    /// The request's messages, now waiting for their answers.
    fn expect(&self, parsed: &Parsed) {
        let mut st = self.lock();
        for m in &parsed.messages {
            if m.method() == Some("initialize")
                && let Some(v) = &m.params.protocol_version
            {
                st.protocol_version = Some(bounded(v));
            }
            if let Name::Str(v) = &m.params.meta.protocol_version {
                st.protocol_version = Some(bounded(v));
            }
            st.pending.push(Pending::of(m));
        }
    }

    /// Whether an answer may carry a `tools/list` result that the policy must filter.
    fn may_list_tools(&self) -> bool {
        let st = self.lock();
        st.stream_only
            || st
                .pending
                .iter()
                .any(|p| p.kind == Kind::Request && p.method == "tools/list")
    }

    /// Server messages (a JSON body or one SSE event): answers settle their requests.
    fn answer(&self, parsed: &Parsed) {
        let mut st = self.lock();
        for m in &parsed.messages {
            if m.kind() != Kind::Response {
                continue;
            }
            if let Some(r) = &m.result {
                if let Some(tools) = &r.tools {
                    self.metrics.mcp.listed_tools(
                        &self.route.name,
                        tools.iter().flatten().map(String::as_str),
                        self.max_tool_labels,
                    );
                }
                if let Some(v) = &r.protocol_version {
                    st.protocol_version = Some(bounded(v));
                }
            }
            let Some(i) = st
                .pending
                .iter()
                .position(|p| p.kind == Kind::Request && p.id == m.id)
            else {
                continue;
            };
            let p = st.pending.remove(i);
            let (outcome, code) = Outcome::of_response(m);
            self.audit(&st, &p, outcome, code, None);
        }
    }

    /// Refused by the policy: every message of the body is logged as denied.
    fn deny(&self, parsed: &Parsed, denials: &[Denial]) {
        let mut st = self.lock();
        st.status = Some(200);
        for (m, d) in parsed.messages.iter().zip(denials) {
            let p = Pending::of(m);
            self.audit(
                &st,
                &p,
                Outcome::Denied,
                Some(d.error().0),
                Some(d.reason()),
            );
        }
    }

    /// Refuses a body the policy cannot judge; one audit line for the whole body.
    fn refuse(
        &self,
        reason: &'static str,
        status: StatusCode,
        code: i64,
        message: &str,
    ) -> Response<Full<Bytes>> {
        let mut st = self.lock();
        st.status = Some(status.as_u16());
        let p = Pending {
            kind: Kind::Invalid,
            id: None,
            method_label: "other",
            method: "(unreadable)".into(),
            tool: None,
            arg_names: None,
            trace_id: None,
        };
        self.audit(&st, &p, Outcome::Denied, Some(code), Some(reason));
        json_response(status, error_body(&Id::Null, code, message))
    }

    /// Refuses a body whose mirrored headers disagree with it (MCP 2026-07-28): 400 with
    /// `HeaderMismatch`, every message logged as denied.
    fn mismatch(&self, parsed: &Parsed, mismatch: &Mismatch) -> Response<Full<Bytes>> {
        let message = mismatch.to_string();
        let mut st = self.lock();
        st.status = Some(StatusCode::BAD_REQUEST.as_u16());
        for m in &parsed.messages {
            let p = Pending::of(m);
            self.audit(
                &st,
                &p,
                Outcome::Denied,
                Some(HEADER_MISMATCH_CODE),
                Some("header_mismatch"),
            );
        }
        drop(st);
        warn!(route = %self.route.name, caller = %self.caller, header = %mismatch.header, detail = %message, "refused MCP request: its headers disagree with its body");
        let id = match parsed.messages.as_slice() {
            [m] if !parsed.batch => m.id.clone().unwrap_or(Id::Null),
            _ => Id::Null,
        };
        json_response(
            StatusCode::BAD_REQUEST,
            error_body(&id, HEADER_MISMATCH_CODE, &message),
        )
    }

    fn too_large(&self) -> Response<Full<Bytes>> {
        self.refuse(
            "request_too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            policy::INVALID_REQUEST_CODE,
            "Request body too large for the tunnel's policy to check (mcp.max_inspect_bytes)",
        )
    }

    fn request_uninspected(&self, reason: &'static str) {
        self.lock().request_uninspected = Some(reason);
    }

    fn response_uninspected(&self, reason: &'static str) {
        self.metrics.mcp.uninspected(&self.route.name, reason);
        self.lock().response_uninspected = Some(reason);
    }

    /// Fail closed on an answer that may list tools but cannot be filtered: each request
    /// still waiting gets a JSON-RPC error instead, as SSE events or as a JSON body.
    fn unfilterable(&self, reason: &'static str, sse: bool) -> Vec<u8> {
        warn!(route = %self.route.name, reason, "MCP answer could not be checked against the route's tool policy: replaced by JSON-RPC errors");
        self.metrics.mcp.uninspected(&self.route.name, reason);
        let mut st = self.lock();
        let pending: Vec<Pending> = st
            .pending
            .extract_if(.., |p| p.kind == Kind::Request)
            .collect();
        let message = "Refused: the server's answer could not be checked against the tunnel's policy for this server";
        let mut errors = Vec::new();
        for p in &pending {
            let id = p.id.clone().unwrap_or(Id::Null);
            errors.push(policy::error_response(&id, policy::REFUSED_CODE, message));
            self.audit(
                &st,
                p,
                Outcome::Error,
                Some(policy::REFUSED_CODE),
                Some(reason),
            );
        }
        if sse {
            let mut out = Vec::new();
            for e in &errors {
                out.extend_from_slice(b"event: message\ndata: ");
                out.extend_from_slice(&serde_json::to_vec(e).unwrap_or_default());
                out.extend_from_slice(b"\n\n");
            }
            return out;
        }
        let value = match errors.len() {
            0 => return Vec::new(),
            1 => errors.remove(0),
            _ => serde_json::Value::Array(errors),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// One audit line and the metrics of one client message.
    fn audit(
        &self,
        st: &State,
        p: &Pending,
        outcome: Outcome,
        code: Option<i64>,
        reason: Option<&'static str>,
    ) {
        let elapsed = self.start.elapsed();
        let latency = (p.kind == Kind::Request && outcome != Outcome::Denied)
            .then_some(elapsed.as_secs_f64());
        self.metrics.mcp.message(
            &self.route.name,
            p.method_label,
            outcome,
            p.tool.as_deref(),
            latency,
            self.max_tool_labels,
        );
        let tool = p.tool.as_deref().map(bounded);
        let id = p.id.as_ref().map(Id::for_log);
        let arguments = p.arg_names.as_ref().map(|a| a.join(","));
        if let (Outcome::Denied, Some(reason)) = (outcome, reason) {
            self.metrics.mcp.refused(&self.route.name, reason);
        }
        let trace_id = p.trace_id.as_deref().or(st.trace_id.as_deref());
        count_audit_record();
        info!(
            target: AUDIT_TARGET,
            route = %self.route.name,
            session_id = st.session_id.as_deref(),
            method = %p.method,
            tool = tool.as_deref(),
            rpc_id = id.as_deref(),
            outcome = outcome.as_str(),
            error_code = code,
            http_status = st.status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            caller = %self.caller,
            protocol_version = st.protocol_version.as_deref(),
            trace_id,
            arguments = arguments.as_deref(),
            reason,
            "mcp message"
        );
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let st = std::mem::take(self.state.get_mut().unwrap_or_else(|e| e.into_inner()));
        if let Some(reason) = st.request_uninspected {
            self.metrics.mcp.uninspected(&self.route.name, reason);
            count_audit_record();
            info!(
                target: AUDIT_TARGET,
                route = %self.route.name,
                session_id = st.session_id.as_deref(),
                http_status = st.status,
                duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
                caller = %self.caller,
                reason,
                "mcp request not inspected"
            );
        }
        for p in &st.pending {
            let outcome = match st.response_uninspected {
                Some(_) if p.kind == Kind::Request => Outcome::Uninspected,
                _ => Outcome::without_answer(p.kind, st.status),
            };
            self.audit(&st, p, outcome, None, None);
        }
    }
}

// ----------------------------------------------------------------------------- request tee

/// A request body streamed upstream as it arrives, with a copy (up to the bound) read for
/// its messages when it ends.
pub struct TeeBody<B> {
    inner: B,
    buf: Vec<u8>,
    max: usize,
    overflow: bool,
    ended: bool,
    arg_names: bool,
    ex: Option<Arc<Exchange>>,
}

impl<B> TeeBody<B> {
    fn new(inner: B, max: usize, arg_names: bool, ex: Arc<Exchange>) -> TeeBody<B> {
        TeeBody {
            inner,
            buf: Vec::new(),
            max,
            overflow: false,
            ended: false,
            arg_names,
            ex: Some(ex),
        }
    }

    fn tee(&mut self, data: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + data.len() > self.max {
            self.overflow = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    fn finish(&mut self) {
        let Some(ex) = self.ex.take() else {
            return;
        };
        if self.overflow {
            ex.request_uninspected("request_too_large");
            return;
        }
        match jsonrpc::parse(
            &self.buf,
            Options {
                arg_names: self.arg_names,
            },
        ) {
            Ok(parsed) => ex.expect(&parsed),
            Err(_) if !self.ended => ex.request_uninspected("request_incomplete"),
            Err(_) => ex.request_uninspected("request_not_json"),
        }
        self.buf = Vec::new();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TeeBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.tee(d);
                }
                if this.inner.is_end_stream() {
                    this.ended = true;
                    this.finish();
                }
            }
            None => {
                this.ended = true;
                this.finish();
            }
            Some(Err(_)) => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for TeeBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

// ----------------------------------------------------------------------------- response

/// Reads (and with a policy, filters) an inspected response body as it streams.
pub struct ResponseInspector {
    ex: Arc<Exchange>,
    mode: Mode,
    ready: VecDeque<Bytes>,
    finished: bool,
}

enum Mode {
    /// Passed on as it comes; a copy read at the end.
    JsonTee { buf: Vec<u8>, overflow: bool },
    /// Held whole (its request listed tools and the route has a policy), filtered, passed on.
    JsonHold { buf: Vec<u8> },
    /// Server-sent events; `hold`: each event passed on (perhaps rewritten) once complete.
    Sse { reader: sse::Reader, hold: bool },
}

impl ResponseInspector {
    /// The inspector for a response, if its body is worth reading. Drops `Content-Length`
    /// when the body may be rewritten.
    pub fn new(
        ex: Arc<Exchange>,
        status: StatusCode,
        headers: &mut HeaderMap,
    ) -> Option<ResponseInspector> {
        ex.set_status(status);
        {
            let mut st = ex.lock();
            if st.session_id.is_none() {
                st.session_id = header_text(headers, "mcp-session-id");
            }
        }
        let policy = ex.policy().is_some();
        let json = content_type_is(headers, "application/json");
        let sse = content_type_is(headers, "text/event-stream");
        if !json && !sse {
            return None;
        }
        if is_encoded(headers) {
            if policy && ex.may_list_tools() {
                headers.remove(header::CONTENT_LENGTH);
                headers.remove(header::CONTENT_ENCODING);
                let body = ex.unfilterable("response_compressed", sse);
                return Some(ResponseInspector {
                    ex,
                    mode: Mode::JsonTee {
                        buf: Vec::new(),
                        overflow: true,
                    },
                    ready: VecDeque::from([Bytes::from(body)]),
                    finished: true,
                });
            }
            ex.response_uninspected("response_compressed");
            return None;
        }
        let max = ex.max_bytes;
        let mode = if sse {
            Mode::Sse {
                reader: sse::Reader::new(max, policy),
                hold: policy,
            }
        } else if policy && ex.may_list_tools() {
            Mode::JsonHold { buf: Vec::new() }
        } else {
            Mode::JsonTee {
                buf: Vec::new(),
                overflow: false,
            }
        };
        if matches!(mode, Mode::JsonHold { .. } | Mode::Sse { hold: true, .. }) {
            headers.remove(header::CONTENT_LENGTH);
        }
        Some(ResponseInspector {
            ex,
            mode,
            ready: VecDeque::new(),
            finished: false,
        })
    }

    /// Whether the bytes passed on may differ from the upstream's.
    pub fn rewrites(&self) -> bool {
        matches!(
            self.mode,
            Mode::JsonHold { .. } | Mode::Sse { hold: true, .. }
        ) || self.finished
    }

    /// Bytes ready to go to the client.
    pub fn next_ready(&mut self) -> Option<Bytes> {
        self.ready.pop_front()
    }

    /// Nothing more will come (after `next_ready` is drained).
    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn is_drained(&self) -> bool {
        self.finished && self.ready.is_empty()
    }

    pub fn on_data(&mut self, data: Bytes) {
        if self.finished {
            return;
        }
        let max = self.ex.max_bytes;
        match &mut self.mode {
            Mode::JsonTee { buf, overflow } => {
                if !*overflow {
                    if buf.len() + data.len() > max {
                        *overflow = true;
                        *buf = Vec::new();
                        self.ex.response_uninspected("response_too_large");
                    } else {
                        buf.extend_from_slice(&data);
                    }
                }
                self.ready.push_back(data);
            }
            Mode::JsonHold { buf } => {
                if buf.len() + data.len() > max {
                    *buf = Vec::new();
                    let body = self.ex.unfilterable("response_too_large", false);
                    self.ready.push_back(Bytes::from(body));
                    self.finished = true;
                } else {
                    buf.extend_from_slice(&data);
                }
            }
            Mode::Sse { reader, hold } => {
                let hold = *hold;
                let mut pieces = Vec::new();
                reader.push(&data, &mut pieces);
                if !hold {
                    self.ready.push_back(data);
                }
                let out = self.events(pieces, hold);
                if !out.is_empty() {
                    self.ready.push_back(Bytes::from(out));
                }
            }
        }
    }

    /// Handles complete events; with `hold`, returns the bytes to pass on for them.
    fn events(&mut self, pieces: Vec<sse::Piece>, hold: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            if self.finished {
                break;
            }
            match piece {
                sse::Piece::Event(ev) => {
                    let replaced = self.event(&ev, hold);
                    if hold {
                        match replaced {
                            Some(bytes) => out.extend_from_slice(&bytes),
                            None => out.extend_from_slice(&ev.raw),
                        }
                    }
                }
                sse::Piece::Uninspected { bytes, first } => {
                    if hold && self.ex.may_list_tools() {
                        out.extend(self.ex.unfilterable("event_too_large", true));
                        self.finished = true;
                        break;
                    }
                    if first {
                        self.ex
                            .metrics
                            .mcp
                            .uninspected(&self.ex.route.name, "event_too_large");
                    }
                    out.extend_from_slice(&bytes);
                }
            }
        }
        out
    }

    /// One complete event: its answers settle requests. With a policy, returns the event
    /// to send instead when it lists hidden tools (or cannot be read).
    fn event(&mut self, ev: &sse::Event, hold: bool) -> Option<Vec<u8>> {
        if !ev.has_data {
            return None;
        }
        let parsed = match jsonrpc::parse(&ev.data, Options::default()) {
            Ok(p) => p,
            Err(_) => {
                self.ex
                    .metrics
                    .mcp
                    .uninspected(&self.ex.route.name, "event_not_json");
                // With a policy, what cannot be read is not passed on.
                return hold.then(Vec::new);
            }
        };
        let filtered = match self.ex.policy() {
            Some(p) if hold => Some(p.filter_tools_list(&ev.data, &parsed)),
            _ => None,
        };
        self.ex.answer(&parsed);
        match filtered {
            Some(Ok(Some((data, hidden)))) => {
                self.ex.metrics.mcp.hidden(&self.ex.route.name, hidden);
                Some(sse::rewrite_event(&ev.raw, &data))
            }
            Some(Err(_)) => Some(self.ex.unfilterable("event_not_filterable", true)),
            _ => None,
        }
    }

    /// The upstream body ended.
    pub fn on_end(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        match &mut self.mode {
            Mode::JsonTee { buf, overflow } => {
                if !*overflow && !buf.is_empty() {
                    match jsonrpc::parse(buf, Options::default()) {
                        Ok(parsed) => self.ex.answer(&parsed),
                        Err(_) => self.ex.response_uninspected("response_not_json"),
                    }
                }
            }
            Mode::JsonHold { buf } => {
                let buf = std::mem::take(buf);
                let out = match jsonrpc::parse(&buf, Options::default()) {
                    Ok(parsed) => {
                        let filtered = self.ex.policy().map(|p| p.filter_tools_list(&buf, &parsed));
                        self.ex.answer(&parsed);
                        match filtered {
                            Some(Ok(Some((data, hidden)))) => {
                                self.ex.metrics.mcp.hidden(&self.ex.route.name, hidden);
                                data
                            }
                            Some(Err(_)) => self.ex.unfilterable("response_not_filterable", false),
                            _ => buf,
                        }
                    }
                    Err(_) if buf.is_empty() => buf,
                    Err(_) => self.ex.unfilterable("response_not_json", false),
                };
                self.ready.push_back(Bytes::from(out));
            }
            Mode::Sse { reader, hold } => {
                // An unfinished last event is never dispatched by a client: pass it on as is.
                let rest = reader.take_pending();
                if *hold && !rest.is_empty() {
                    self.ready.push_back(Bytes::from(rest));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!is_encoded(&h));
        h.append(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(is_encoded(&h));
    }
}

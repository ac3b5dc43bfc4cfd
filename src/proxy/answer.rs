//! The proxy's own answers: every request the data path does not forward, or cannot get an
//! upstream answer for, gets one of these. Each knows its status, its body, the counter it
//! moves and its log line, so the data path, `explain` and `doctor` say the same thing
//! (README, "Routing and answers", lists them; a test keeps that table true).

use std::fmt;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use tracing::{info, warn};

use super::metrics::{LimitHit, ProxyMetrics, Refusal, UpstreamOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Neither `Host` nor an authority names the request's host.
    MissingHost,
    /// No route for the request's host.
    NoRoute,
    /// The inner TLS server name selects another route than `Host` does.
    Misdirected,
    /// A CONNECT request: the proxy forwards requests, it does not open tunnels.
    Connect,
    /// The request body is over `limits.max_request_body_bytes`.
    BodyTooLarge,
    /// An address the upstream resolved to is outside the allowed ranges (the SSRF defence).
    AddressNotAllowed,
    /// The upstream refused, was unreachable, or its TLS failed.
    ConnectFailed,
    ConnectTimeout,
    /// No response head within `upstream.response_header_timeout`.
    ResponseTimeout,
    /// The upstream connection failed after the request was sent, or its answer was not
    /// valid HTTP (a framing anomaly closes that connection).
    UpstreamFailed,
    /// A reload removed the route, or made its upstream not allowed, while the request
    /// waited for its answer.
    RouteRevoked,
}

/// Who made an answer necessary, for the log line's level: a client's request that cannot
/// be served is routine (`info`); an upstream or a reload that failed one is worth a `warn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Request,
    Upstream,
}

impl Answer {
    pub const ALL: [Answer; 11] = [
        Answer::MissingHost,
        Answer::NoRoute,
        Answer::Misdirected,
        Answer::Connect,
        Answer::BodyTooLarge,
        Answer::AddressNotAllowed,
        Answer::ConnectFailed,
        Answer::ConnectTimeout,
        Answer::ResponseTimeout,
        Answer::UpstreamFailed,
        Answer::RouteRevoked,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Answer::MissingHost => StatusCode::BAD_REQUEST,
            Answer::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Answer::Connect => StatusCode::METHOD_NOT_ALLOWED,
            Answer::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Answer::ConnectTimeout | Answer::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            Answer::NoRoute
            | Answer::AddressNotAllowed
            | Answer::ConnectFailed
            | Answer::UpstreamFailed
            | Answer::RouteRevoked => StatusCode::BAD_GATEWAY,
        }
    }

    /// The body, plain text, one line. `doctor` tells the proxy's answers from an
    /// upstream's with the same status by it ([`Answer::recognise`]).
    pub fn body(self) -> &'static str {
        match self {
            Answer::MissingHost => "Missing Host header\n",
            Answer::NoRoute => "No route configured for host\n",
            Answer::Misdirected => {
                "Misdirected request: the TLS server name and the Host header name different routes\n"
            }
            Answer::Connect => "CONNECT is not supported\n",
            Answer::BodyTooLarge => "Request body too large (limits.max_request_body_bytes)\n",
            Answer::AddressNotAllowed => {
                "Upstream address not allowed: the upstream resolved outside upstream.allowed_ips\n"
            }
            Answer::ConnectFailed => "Upstream connection failed\n",
            Answer::ConnectTimeout => "Upstream connection timed out\n",
            Answer::ResponseTimeout => "Upstream did not answer in time\n",
            Answer::UpstreamFailed => "Upstream request failed\n",
            Answer::RouteRevoked => "Route removed or no longer allowed\n",
        }
    }

    /// The message of the answer's log line. The SSRF refusal's line is the dial error
    /// itself (`IP validation failed: <ip> is not a private address`, the reference stack's
    /// wording), given as the detail.
    pub fn log_line(self) -> &'static str {
        match self {
            Answer::MissingHost => "refused request: no Host header",
            Answer::NoRoute => "no route for host",
            Answer::Misdirected => {
                "misdirected request: TLS server name and Host select different routes"
            }
            Answer::Connect => "refused request: CONNECT is not supported",
            Answer::BodyTooLarge => "refused request: body over limits.max_request_body_bytes",
            Answer::AddressNotAllowed => "upstream address not allowed",
            Answer::ConnectFailed => "upstream connection failed",
            Answer::ConnectTimeout => "upstream connect timeout",
            Answer::ResponseTimeout => "upstream response header timeout",
            Answer::UpstreamFailed => "upstream request failed",
            Answer::RouteRevoked => "request ended: route removed or no longer allowed",
        }
    }

    fn cause(self) -> Cause {
        match self {
            Answer::MissingHost
            | Answer::NoRoute
            | Answer::Misdirected
            | Answer::Connect
            | Answer::BodyTooLarge => Cause::Request,
            Answer::AddressNotAllowed
            | Answer::ConnectFailed
            | Answer::ConnectTimeout
            | Answer::ResponseTimeout
            | Answer::UpstreamFailed
            | Answer::RouteRevoked => Cause::Upstream,
        }
    }

    /// The counter the answer moves: a refusal (`mcp_tunnel_refusals_total{reason}`) or a
    /// limit (`mcp_tunnel_limit_hits_total{limit}`).
    pub fn counter(self) -> Counter {
        match self {
            Answer::MissingHost | Answer::Connect => Counter::Refusal(Refusal::BadRequest),
            Answer::NoRoute => Counter::Refusal(Refusal::NoRoute),
            Answer::Misdirected => Counter::Refusal(Refusal::Misdirected),
            Answer::BodyTooLarge => Counter::Limit(LimitHit::RequestBodyTooLarge),
            Answer::AddressNotAllowed => Counter::Refusal(Refusal::IpNotAllowed),
            Answer::ConnectFailed => Counter::Refusal(Refusal::ConnectFailed),
            Answer::ConnectTimeout => Counter::Refusal(Refusal::ConnectTimeout),
            Answer::ResponseTimeout => Counter::Refusal(Refusal::ResponseTimeout),
            Answer::UpstreamFailed => Counter::Refusal(Refusal::UpstreamError),
            Answer::RouteRevoked => Counter::Refusal(Refusal::RouteRevoked),
        }
    }

    /// Counts the answer and writes its log line: what every answer the data path gives
    /// does first.
    pub fn record(self, metrics: &ProxyMetrics, said: &Said<'_>) {
        self.count(metrics, said.route);
        self.log(said);
    }

    /// Counts the answer; one that stands for what the route's upstream did (it failed or
    /// timed out) is also the route's last upstream outcome, for the status page.
    fn count(self, metrics: &ProxyMetrics, route: &str) {
        match self.counter() {
            Counter::Refusal(r) => {
                metrics.refusal(r);
                if self.cause() == Cause::Upstream && self != Answer::RouteRevoked {
                    metrics.upstream(route, UpstreamOutcome::Failed(r));
                }
            }
            Counter::Limit(l) => metrics.limit(l),
        }
    }

    /// Writes the answer's log line with what the request was.
    fn log(self, said: &Said<'_>) {
        let detail: &dyn fmt::Display = said.detail.unwrap_or(&"");
        let message: &dyn fmt::Display = match (self, said.detail) {
            (Answer::AddressNotAllowed, Some(d)) => d,
            _ => &self.log_line(),
        };
        let Said {
            route,
            host,
            method,
            path,
            ..
        } = said;
        match self.cause() {
            Cause::Request => {
                info!(route, host, method, path, detail = %detail, status = self.status().as_u16(), "{message}")
            }
            Cause::Upstream => {
                warn!(route, host, method, path, detail = %detail, status = self.status().as_u16(), "{message}")
            }
        }
    }

    /// The response, plain text.
    pub fn response(self) -> Response<Full<Bytes>> {
        text_response(self.status(), self.body())
    }

    /// `502 No route configured for host`: the answer as a person reads it.
    pub fn describe(self) -> String {
        format!("{} {}", self.status().as_u16(), self.body().trim_end())
    }

    /// The proxy's answer a response is, from its status and body, or `None` for an
    /// upstream's own answer.
    pub fn recognise(status: u16, body: &[u8]) -> Option<Answer> {
        Answer::ALL
            .into_iter()
            .find(|a| a.status().as_u16() == status && a.body().as_bytes() == body)
    }
}

/// What an answer's log line says beside its message; `""` for what is not known yet (the
/// route before routing).
pub struct Said<'a> {
    pub route: &'a str,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The error or the fact that decided (the dial error, the TLS server name, the limit).
    pub detail: Option<&'a dyn fmt::Display>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Refusal(Refusal),
    Limit(LimitHit),
}

/// A plain-text response (the proxy's answers, and the listener's own).
pub fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_is_told_apart_by_its_status_and_body() {
        for a in Answer::ALL {
            assert_eq!(
                Answer::recognise(a.status().as_u16(), a.body().as_bytes()),
                Some(a)
            );
            assert!(
                a.body().ends_with('\n') && a.body().lines().count() == 1,
                "{a:?}"
            );
        }
        assert_eq!(Answer::recognise(502, b"Bad Gateway"), None);
        assert_eq!(
            Answer::recognise(404, Answer::NoRoute.body().as_bytes()),
            None
        );
    }

    #[test]
    fn every_refusal_reason_and_the_body_limit_are_some_answers_counter() {
        for r in Refusal::ALL {
            assert!(
                Answer::ALL
                    .iter()
                    .any(|a| a.counter() == Counter::Refusal(r)),
                "{r:?} is counted by no answer"
            );
        }
        assert!(
            Answer::ALL
                .iter()
                .any(|a| a.counter() == Counter::Limit(LimitHit::RequestBodyTooLarge))
        );
    }

    /// README's "Routing and answers" table is what operators read: it lists every answer
    /// with its status and body.
    #[test]
    fn the_readme_lists_every_answer() {
        let readme = include_str!("../../README.md");
        let (_, table) = readme
            .split_once("### Routing and answers")
            .expect("README has the section");
        for a in Answer::ALL {
            let row = format!("| {} `{}` |", a.status().as_u16(), a.body().trim_end());
            assert!(table.contains(&row), "README lacks `{row}` for {a:?}");
        }
    }
}

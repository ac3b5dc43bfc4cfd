//! MCP on the wire, read cheaply: facts (method, id, tool, outcome) from JSON-RPC bodies and
//! SSE events, and tool-policy verdicts. Pure functions on bounded byte slices, no I/O: the
//! proxy (`proxy::mcp`) feeds them only on routes that ask for inspection or a policy, so
//! the plain path pays nothing.

pub mod headers;
pub mod jsonrpc;
pub mod policy;
pub mod sse;

pub use jsonrpc::{Id, Kind, Message, Options, Parsed, parse};
pub use policy::{Decision, Denial, Pattern, Policy};

/// Methods with a metric label of their own (MCP 2025-11-25 and earlier, then 2026-07-28
/// and its Tasks extension); any other method counts as `other`, so a caller cannot grow the
/// label set.
pub const KNOWN_METHODS: [&str; 35] = [
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
    "notifications/tasks/status",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "notifications/message",
    "notifications/resources/updated",
    "notifications/resources/list_changed",
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "server/discover",
    "subscriptions/listen",
    "notifications/subscriptions/acknowledged",
    "tasks/update",
    "notifications/tasks",
];

/// The metric label of a client message: its method when known, `response` for the
/// client's answer to a server request, else `other`.
pub fn method_label(m: &Message) -> &'static str {
    match m.method() {
        Some(method) => KNOWN_METHODS
            .iter()
            .find(|k| **k == method)
            .copied()
            .unwrap_or("other"),
        None if m.kind() == Kind::Response => "response",
        None => "other",
    }
}

/// How one client message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A result.
    Ok,
    /// A result with `isError: true`: the tool ran and failed.
    ToolError,
    /// A JSON-RPC error (its code is in the audit line).
    Error,
    /// Refused by the route's policy; never forwarded.
    Denied,
    /// A notification or response the server accepted (HTTP 2xx, usually 202).
    Accepted,
    /// The HTTP exchange failed (status >= 400 without a JSON-RPC answer, or the proxy's
    /// own 502/504).
    HttpError,
    /// No answer seen: the stream ended or the client went away first.
    NoResponse,
    /// The answer could not be read (too large, compressed, not JSON-RPC).
    Uninspected,
}

impl Outcome {
    /// Every outcome, in the order of their discriminants.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::ToolError,
        Outcome::Error,
        Outcome::Denied,
        Outcome::Accepted,
        Outcome::HttpError,
        Outcome::NoResponse,
        Outcome::Uninspected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ToolError => "tool_error",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
            Outcome::Accepted => "accepted",
            Outcome::HttpError => "http_error",
            Outcome::NoResponse => "no_response",
            Outcome::Uninspected => "uninspected",
        }
    }

    /// The outcome a response message carries, with its error code.
    pub fn of_response(m: &Message) -> (Outcome, Option<i64>) {
        match (&m.error, &m.result) {
            (Some(code), _) => (Outcome::Error, *code),
            (None, Some(r)) if r.is_error => (Outcome::ToolError, None),
            (None, Some(_)) => (Outcome::Ok, None),
            (None, None) => (Outcome::Uninspected, None),
        }
    }

    /// The outcome of a message no JSON-RPC answer was seen for, from the HTTP status
    /// (`None`: no response at all).
    pub fn without_answer(kind: Kind, status: Option<u16>) -> Outcome {
        match status {
            Some(s) if s >= 400 => Outcome::HttpError,
            Some(s) if (200..300).contains(&s) && kind != Kind::Request => Outcome::Accepted,
            _ => Outcome::NoResponse,
        }
    }

    /// Whether the server knew the tool (it ran it): only then does a tool name earn its
    /// own metric label.
    pub fn tool_known(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::ToolError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        let m = |s: &str| parse(s.as_bytes(), Options::default()).unwrap().messages[0].clone();
        assert_eq!(
            method_label(&m(r#"{"id":1,"method":"tools/call"}"#)),
            "tools/call"
        );
        assert_eq!(method_label(&m(r#"{"id":1,"method":"x/y"}"#)), "other");
        assert_eq!(
            method_label(&m(r#"{"id":1,"method":"server/discover"}"#)),
            "server/discover"
        );
        assert_eq!(
            method_label(&m(r#"{"id":1,"method":"subscriptions/listen"}"#)),
            "subscriptions/listen"
        );
        assert_eq!(method_label(&m(r#"{"id":1,"result":{}}"#)), "response");
        assert_eq!(method_label(&m(r#"{"id":1}"#)), "other");
    }

    #[test]
    fn outcome_indexes_match() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i, "{o:?}");
        }
    }

    #[test]
    fn outcomes() {
        let m = |s: &str| parse(s.as_bytes(), Options::default()).unwrap().messages[0].clone();
        assert_eq!(
            Outcome::of_response(&m(r#"{"id":1,"result":{}}"#)),
            (Outcome::Ok, None)
        );
        assert_eq!(
            Outcome::of_response(&m(r#"{"id":1,"result":{"isError":true}}"#)),
            (Outcome::ToolError, None)
        );
        assert_eq!(
            Outcome::of_response(&m(r#"{"id":1,"error":{"code":-32000}}"#)),
            (Outcome::Error, Some(-32000))
        );
        assert_eq!(
            Outcome::without_answer(Kind::Notification, Some(202)),
            Outcome::Accepted
        );
        assert_eq!(
            Outcome::without_answer(Kind::Request, Some(200)),
            Outcome::NoResponse
        );
        assert_eq!(
            Outcome::without_answer(Kind::Request, Some(502)),
            Outcome::HttpError
        );
        assert_eq!(
            Outcome::without_answer(Kind::Request, None),
            Outcome::NoResponse
        );
    }
}

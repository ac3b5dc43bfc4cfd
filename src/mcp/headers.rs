//! The standard request headers of MCP 2026-07-28 (SEP-2243), checked against the body.
//!
//! A client of that revision mirrors parts of the JSON-RPC body into headers (`Mcp-Method`,
//! `Mcp-Name`, `Mcp-Param-*`, with `MCP-Protocol-Version` equal to `_meta`'s revision) so that
//! load balancers and servers can act without reading the body. The proxy's policy judges
//! the body; if the headers could say something else, a component behind the proxy that acts
//! on them would be told a different tool than the one the policy allowed. So where the proxy
//! reads bodies, headers and body must agree or the request is refused with 400 and
//! `HeaderMismatch` (-32020), as the revision requires of a receiver.
//!
//! Older revisions never send these headers; a request of the older era that carries one
//! anyway is held to the same agreement, because the component behind us cannot know which
//! era the sender meant. Headers are never stripped or rewritten: what reaches the upstream
//! is what the client sent.

use base64::Engine;
use http::HeaderMap;

use super::jsonrpc::{Kind, Message, Name, Parsed};

/// JSON-RPC error code of a request whose headers disagree with its body (2026-07-28).
pub const HEADER_MISMATCH_CODE: i64 = -32020;

/// The first revision with stateless requests and standard headers.
pub const MODERN_REVISION: &str = "2026-07-28";

/// Which protocol family a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// 2025-11-25 and earlier: `initialize` handshake, `Mcp-Session-Id`.
    Legacy,
    /// 2026-07-28 and later: the revision in every request's `_meta`.
    Modern,
}

/// Why the headers and the body disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The header at fault, as the revision spells it.
    pub header: String,
    pub problem: Problem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// A header the revision requires for this request is absent.
    Missing,
    /// Its value differs from the body's.
    Differs,
    /// It names a value the body does not have.
    Orphan,
    /// Sent more than once: the proxy cannot know which copy a receiver reads.
    Repeated,
    /// Not visible ASCII, or a `=?base64?...?=` value that does not decode to UTF-8.
    Invalid,
    /// Mirrored headers on a batch: one header cannot describe several messages.
    Batch,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.header;
        match self.problem {
            Problem::Missing => write!(
                f,
                "Header mismatch: {h} is required on a {MODERN_REVISION} request and is missing"
            ),
            Problem::Differs => write!(
                f,
                "Header mismatch: the {h} header does not match the request body"
            ),
            Problem::Orphan => write!(
                f,
                "Header mismatch: the {h} header names a value the request body does not have"
            ),
            Problem::Repeated => {
                write!(f, "Header mismatch: the {h} header appears more than once")
            }
            Problem::Invalid => write!(f, "Header mismatch: the {h} header has an invalid value"),
            Problem::Batch => write!(
                f,
                "Header mismatch: {h} describes one JSON-RPC message, and the body is a batch"
            ),
        }
    }
}

/// Whether `v` names the 2026-07-28 revision or a later one (a `YYYY-MM-DD` date).
pub fn is_modern_revision(v: &str) -> bool {
    let date_shaped = v.len() == 10
        && v.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    date_shaped && v >= MODERN_REVISION
}

/// The body field `Mcp-Name` mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameField {
    /// `params.name`: `tools/call`, `prompts/get`.
    Name,
    /// `params.uri`: `resources/read`.
    Uri,
    /// `params.taskId`: `tasks/get`, `tasks/update`, `tasks/cancel` (Tasks extension, SEP-2663).
    TaskId,
}

/// The body field `Mcp-Name` mirrors for `method`, if it has one.
pub fn name_source(method: &str) -> Option<NameField> {
    match method {
        "tools/call" | "prompts/get" => Some(NameField::Name),
        "resources/read" => Some(NameField::Uri),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some(NameField::TaskId),
        _ => None,
    }
}

/// Whether `method` is one the proxy knows to carry no name: an `Mcp-Name` on it can only
/// mislead. A method it does not know (an extension's) may define one, so its `Mcp-Name`
/// passes unchecked, as an intermediary passes headers it does not recognise.
fn names_nothing(method: &str) -> bool {
    name_source(method).is_none() && super::KNOWN_METHODS.contains(&method)
}

/// Whether the request carries a header this module checks: then the proxy must read the
/// body before anything goes upstream.
pub fn present(headers: &HeaderMap) -> bool {
    headers.contains_key("mcp-method")
        || headers.contains_key("mcp-name")
        || headers.keys().any(|k| k.as_str().starts_with("mcp-param-"))
        || headers
            .get("mcp-protocol-version")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| is_modern_revision(v.trim()))
}

/// The request's era, or why its headers and body disagree.
pub fn check(headers: &HeaderMap, parsed: &Parsed) -> Result<Era, Mismatch> {
    let version = single(headers, "mcp-protocol-version", "MCP-Protocol-Version")?;
    let method = single(headers, "mcp-method", "Mcp-Method")?;
    let name = single(headers, "mcp-name", "Mcp-Name")?;
    let mut params = false;
    for (key, value) in headers {
        if let Some(suffix) = key.as_str().strip_prefix("mcp-param-") {
            params = true;
            let text = value.to_str().map_err(|_| invalid_param(suffix))?;
            decode(text.trim_matches([' ', '\t'])).ok_or_else(|| invalid_param(suffix))?;
        }
    }
    let body_modern = parsed
        .messages
        .iter()
        .any(|m| matches!(&m.params.meta.protocol_version, Name::Str(v) if is_modern_revision(v)));
    let era = if body_modern || version.is_some_and(is_modern_revision) {
        Era::Modern
    } else {
        Era::Legacy
    };
    let mirrors = method.is_some() || name.is_some() || params;
    if era == Era::Legacy && !mirrors {
        return Ok(era);
    }
    let m = match parsed.messages.as_slice() {
        [m] if !parsed.batch => m,
        _ => {
            let header = if method.is_some() || era == Era::Legacy {
                "Mcp-Method"
            } else {
                "MCP-Protocol-Version"
            };
            return Err(mismatch(header, Problem::Batch));
        }
    };
    let kind = m.kind();
    if era == Era::Modern {
        check_version(version, m)?;
    }
    check_method(method, m, kind, era)?;
    check_name(name, m, kind, era)?;
    Ok(era)
}

fn mismatch(header: &str, problem: Problem) -> Mismatch {
    Mismatch {
        header: header.to_owned(),
        problem,
    }
}

fn invalid_param(suffix: &str) -> Mismatch {
    mismatch(&format!("Mcp-Param-{suffix}"), Problem::Invalid)
}

/// A header sent at most once, as text with the optional whitespace around it removed.
fn single<'h>(
    headers: &'h HeaderMap,
    key: &str,
    spelled: &str,
) -> Result<Option<&'h str>, Mismatch> {
    let mut values = headers.get_all(key).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(mismatch(spelled, Problem::Repeated));
    }
    let text = first
        .to_str()
        .map_err(|_| mismatch(spelled, Problem::Invalid))?;
    Ok(Some(text.trim_matches([' ', '\t'])))
}

/// A mirrored value as the client meant it: `=?base64?...?=` decoded (markers lowercase,
/// padding required), anything else as it is. `None`: the encoded form does not decode.
fn decode(value: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="));
    match inner {
        None => Some(value.into()),
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            String::from_utf8(bytes).ok().map(Into::into)
        }
    }
}

fn check_version(header: Option<&str>, m: &Message) -> Result<(), Mismatch> {
    const H: &str = "MCP-Protocol-Version";
    match (header, &m.params.meta.protocol_version) {
        (Some(h), Name::Str(b)) if h == b => Ok(()),
        (Some(_), Name::Str(_) | Name::Invalid) => Err(mismatch(H, Problem::Differs)),
        // A request without the revision in `_meta` is malformed, and the revision gives the
        // server its own error for it (-32602 with 400); nothing in it disagrees.
        (Some(_), Name::Absent) => Ok(()),
        (None, _) => Err(mismatch(H, Problem::Missing)),
    }
}

fn check_method(header: Option<&str>, m: &Message, kind: Kind, era: Era) -> Result<(), Mismatch> {
    const H: &str = "Mcp-Method";
    match (header, m.method()) {
        (Some(h), Some(b)) if h == b => Ok(()),
        (Some(_), Some(_)) => Err(mismatch(H, Problem::Differs)),
        (Some(_), None) => Err(mismatch(H, Problem::Orphan)),
        (None, _) if era == Era::Modern && kind == Kind::Request => {
            Err(mismatch(H, Problem::Missing))
        }
        (None, _) => Ok(()),
    }
}

fn check_name(header: Option<&str>, m: &Message, kind: Kind, era: Era) -> Result<(), Mismatch> {
    const H: &str = "Mcp-Name";
    let body = m.method().and_then(name_source).map(|field| match field {
        NameField::Name => &m.params.name,
        NameField::Uri => &m.params.uri,
        NameField::TaskId => &m.params.task_id,
    });
    if body.is_none() && !m.method().is_some_and(names_nothing) && kind != Kind::Response {
        return Ok(());
    }
    match (header, body) {
        (Some(h), Some(Name::Str(b))) => match decode(h) {
            Some(h) if h == b.as_str() => Ok(()),
            Some(_) => Err(mismatch(H, Problem::Differs)),
            None => Err(mismatch(H, Problem::Invalid)),
        },
        (Some(_), Some(Name::Invalid)) => Err(mismatch(H, Problem::Differs)),
        (Some(_), _) => Err(mismatch(H, Problem::Orphan)),
        (None, Some(Name::Str(_))) if era == Era::Modern && kind == Kind::Request => {
            Err(mismatch(H, Problem::Missing))
        }
        (None, _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::jsonrpc::{Options, parse};
    use super::*;

    const V: &str = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}"#;

    fn run(headers: &[(&str, &str)], body: &str) -> Result<Era, Mismatch> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        check(&h, &parse(body.as_bytes(), Options::default()).unwrap())
    }

    fn call(name: &str) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{{}},{V}}}}}"#
        )
    }

    fn err(header: &str, problem: Problem) -> Result<Era, Mismatch> {
        Err(mismatch(header, problem))
    }

    const MODERN: [(&str, &str); 3] = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo"),
    ];

    #[test]
    fn modern_requests_whose_headers_agree_pass() {
        assert_eq!(run(&MODERN, &call("echo")), Ok(Era::Modern));
        // Optional whitespace around a value is not part of it; header names ignore case.
        let spaced = [
            ("MCP-Protocol-Version", " 2026-07-28"),
            ("Mcp-Method", "tools/call\t"),
            ("MCP-NAME", "  echo "),
        ];
        assert_eq!(run(&spaced, &call("echo")), Ok(Era::Modern));
        // "Hello, 世界", the revision's own example of the encoded form.
        let encoded = [
            MODERN[0],
            MODERN[1],
            ("mcp-name", "=?base64?SGVsbG8sIOS4lueVjA==?="),
        ];
        assert_eq!(run(&encoded, &call("Hello, 世界")), Ok(Era::Modern));
        let read = format!(
            r#"{{"jsonrpc":"2.0","id":"r","method":"resources/read","params":{{"uri":"file:///a b",{V}}}}}"#
        );
        let h = [
            MODERN[0],
            ("mcp-method", "resources/read"),
            ("mcp-name", "file:///a b"),
        ];
        assert_eq!(run(&h, &read), Ok(Era::Modern));
        let list = format!(r#"{{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{{{V}}}}}"#);
        assert_eq!(
            run(&[MODERN[0], ("mcp-method", "tools/list")], &list),
            Ok(Era::Modern)
        );
        let task = format!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{{"taskId":"t-1",{V}}}}}"#
        );
        let h = [MODERN[0], ("mcp-method", "tasks/get"), ("mcp-name", "t-1")];
        assert_eq!(run(&h, &task), Ok(Era::Modern));
        // A method of an extension the proxy does not know may define an Mcp-Name of its own.
        let ext = format!(
            r#"{{"jsonrpc":"2.0","id":4,"method":"acme/lookup","params":{{"key":"k",{V}}}}}"#
        );
        let h = [MODERN[0], ("mcp-method", "acme/lookup"), ("mcp-name", "k")];
        assert_eq!(run(&h, &ext), Ok(Era::Modern));
        // Without the revision in `_meta` the request is malformed, and the server says so
        // (-32602): the proxy passes it on.
        let bare = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#;
        assert_eq!(run(&MODERN, bare), Ok(Era::Modern));
        // A parameter header the proxy cannot map is forwarded, only its encoding is checked.
        let p = [
            MODERN[0],
            MODERN[1],
            MODERN[2],
            ("mcp-param-region", "us-west1"),
        ];
        assert_eq!(run(&p, &call("echo")), Ok(Era::Modern));
    }

    #[test]
    fn legacy_requests_without_mirrors_pass_untouched() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
        assert_eq!(run(&[], body), Ok(Era::Legacy));
        assert_eq!(
            run(&[("mcp-protocol-version", "2025-11-25")], body),
            Ok(Era::Legacy)
        );
        let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        assert_eq!(
            run(&[("mcp-protocol-version", "2025-06-18")], batch),
            Ok(Era::Legacy)
        );
        // Not a date: not a revision this module knows, the server decides.
        assert_eq!(
            run(&[("mcp-protocol-version", "draft")], body),
            Ok(Era::Legacy)
        );
    }

    /// Headers, body, and what `check` must say.
    type Case = (
        Vec<(&'static str, &'static str)>,
        String,
        Result<Era, Mismatch>,
    );

    #[test]
    fn disagreement_is_refused() {
        let cases: Vec<Case> = vec![
            // The tool the policy judged is not the tool the header names.
            (
                MODERN.to_vec(),
                call("rm_rf"),
                err("Mcp-Name", Problem::Differs),
            ),
            (
                vec![MODERN[0], ("mcp-method", "tools/list"), MODERN[2]],
                call("echo"),
                err("Mcp-Method", Problem::Differs),
            ),
            // Values are case-sensitive.
            (
                vec![MODERN[0], ("mcp-method", "TOOLS/CALL"), MODERN[2]],
                call("echo"),
                err("Mcp-Method", Problem::Differs),
            ),
            (
                vec![("mcp-protocol-version", "2026-09-01"), MODERN[1], MODERN[2]],
                call("echo"),
                err("MCP-Protocol-Version", Problem::Differs),
            ),
            // Required on a modern request.
            (
                vec![MODERN[0], MODERN[2]],
                call("echo"),
                err("Mcp-Method", Problem::Missing),
            ),
            (
                vec![MODERN[0], MODERN[1]],
                call("echo"),
                err("Mcp-Name", Problem::Missing),
            ),
            (
                vec![MODERN[1], MODERN[2]],
                call("echo"),
                err("MCP-Protocol-Version", Problem::Missing),
            ),
            // A header for a value the body lacks.
            (
                vec![
                    MODERN[0],
                    ("mcp-method", "tools/list"),
                    ("mcp-name", "echo"),
                ],
                format!(r#"{{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{{{V}}}}}"#),
                err("Mcp-Name", Problem::Orphan),
            ),
            // The task a tasks/get names (Tasks extension).
            (
                vec![MODERN[0], ("mcp-method", "tasks/get"), ("mcp-name", "t-2")],
                format!(
                    r#"{{"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{{"taskId":"t-1",{V}}}}}"#
                ),
                err("Mcp-Name", Problem::Differs),
            ),
            // Repeated: which copy would the server read?
            (
                vec![MODERN[0], MODERN[1], MODERN[2], ("mcp-name", "rm_rf")],
                call("echo"),
                err("Mcp-Name", Problem::Repeated),
            ),
            // Encoded forms that do not decode; uppercase markers are a literal value.
            (
                vec![MODERN[0], MODERN[1], ("mcp-name", "=?base64?SGVsbG8?=")],
                call("Hello"),
                err("Mcp-Name", Problem::Invalid),
            ),
            (
                vec![MODERN[0], MODERN[1], ("mcp-name", "=?BASE64?ZWNobw==?=")],
                call("echo"),
                err("Mcp-Name", Problem::Differs),
            ),
            (
                vec![
                    MODERN[0],
                    MODERN[1],
                    MODERN[2],
                    ("mcp-param-region", "=?base64?!!?="),
                ],
                call("echo"),
                err("Mcp-Param-region", Problem::Invalid),
            ),
            (
                vec![
                    MODERN[0],
                    MODERN[1],
                    MODERN[2],
                    ("mcp-param-region", "caf\u{e9}"),
                ],
                call("echo"),
                err("Mcp-Param-region", Problem::Invalid),
            ),
            // One header cannot describe a batch.
            (
                MODERN.to_vec(),
                format!("[{},{}]", call("echo"), call("rm_rf")),
                err("Mcp-Method", Problem::Batch),
            ),
            // A legacy request that carries a mirror is held to it.
            (
                vec![("mcp-name", "echo")],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm_rf"}}"#
                    .into(),
                err("Mcp-Name", Problem::Differs),
            ),
            // The body's `_meta` alone makes a request modern: its headers are then required.
            (
                vec![],
                call("echo"),
                err("MCP-Protocol-Version", Problem::Missing),
            ),
        ];
        for (headers, body, want) in cases {
            assert_eq!(run(&headers, &body), want, "{headers:?} {body}");
        }
    }

    #[test]
    fn notifications_need_no_method_header_but_one_sent_must_agree() {
        let n = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/cancelled","params":{{"requestId":1,{V}}}}}"#
        );
        assert_eq!(run(&[MODERN[0]], &n), Ok(Era::Modern));
        assert_eq!(
            run(&[MODERN[0], ("mcp-method", "notifications/cancelled")], &n),
            Ok(Era::Modern)
        );
        assert_eq!(
            run(&[MODERN[0], ("mcp-method", "tools/call")], &n),
            err("Mcp-Method", Problem::Differs)
        );
    }

    #[test]
    fn revisions() {
        for (v, modern) in [
            ("2026-07-28", true),
            ("2027-01-01", true),
            ("2025-11-25", false),
            ("2026-7-28", false),
            ("2026-07-28x", false),
            ("9999-99-99", true),
            ("", false),
        ] {
            assert_eq!(is_modern_revision(v), modern, "{v}");
        }
    }

    #[test]
    fn messages_name_the_header() {
        assert_eq!(
            mismatch("Mcp-Name", Problem::Differs).to_string(),
            "Header mismatch: the Mcp-Name header does not match the request body"
        );
    }
}

//! cloudflared's log lines (`--output json`) re-emitted through tracing under target
//! `cloudflared`, with cloudflared's fields as structured fields (journald:
//! `F_CLOUDFLARED_CONN_INDEX=0`, `F_CLOUDFLARED_EVENT=registered`, ...) and the few events the
//! supervisor acts on classified from those fields.
//!
//! Two facts about the real connector shape this module (docs/CLOUDFLARED.md):
//! - it writes each JSON field of an event with its own `write(2)` and no lock, so events
//!   logged at the same instant come out spliced (`{"connIndex":1{"connIndex":2,...}` then
//!   `,"level":"info",...}`). Such lines are resynchronised where possible and keep their
//!   level, but never decide a classification;
//! - at debug level it logs request URLs, so free text is caller-controlled: only the fixed
//!   `message` of a whole JSON event and its `error` field are ever matched.

use serde_json::{Map, Value};
use tracing::{debug, error, info, warn};

/// cloudflared's severity, or the one the supervisor gives a routine event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn parse(s: &str) -> Level {
        match s {
            "debug" | "trace" => Level::Debug,
            "warn" | "warning" => Level::Warn,
            "error" | "fatal" | "panic" => Level::Error,
            _ => Level::Info,
        }
    }
}

/// One JSON event from cloudflared.
#[derive(Debug, PartialEq)]
pub struct Line {
    /// The level cloudflared wrote.
    pub level: Level,
    pub message: String,
    /// Every other field except `level`, `message` and `time`.
    pub fields: Map<String, Value>,
}

impl Line {
    fn field_str(&self, k: &str) -> Option<&str> {
        self.fields.get(k).and_then(Value::as_str)
    }
}

/// What one line of output turned out to be.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A whole JSON event: the only kind that is classified.
    Whole(Line),
    /// A whole event found after a spliced fragment (`rest` is the fragment before it).
    Recovered { line: Line, rest: String },
    /// A piece of a spliced JSON event; its level if it could be read.
    Fragment { level: Option<Level>, text: String },
    /// Plain text (start-up refusals are printed this way even with `--output json`).
    Plain(String),
}

/// Parses one line of cloudflared output (without its newline).
pub fn parse(raw: &str) -> Parsed {
    let raw = raw.trim();
    if let Some(line) = event_from(raw) {
        return Parsed::Whole(line);
    }
    if !raw.contains("\":") {
        return Parsed::Plain(raw.to_string());
    }
    // Resynchronise: the first `{"` after the start that begins a complete event.
    let mut from = 1;
    while let Some(i) = raw.get(from..).and_then(|s| s.find("{\"")) {
        let at = from + i;
        let mut stream = serde_json::Deserializer::from_str(&raw[at..]).into_iter::<Value>();
        if let Some(Ok(Value::Object(obj))) = stream.next()
            && obj.contains_key("message")
        {
            return Parsed::Recovered {
                line: line_from(obj),
                rest: raw[..at].to_string(),
            };
        }
        from = at + 2;
    }
    Parsed::Fragment {
        level: fragment_level(raw),
        text: raw.to_string(),
    }
}

fn event_from(raw: &str) -> Option<Line> {
    match serde_json::from_str(raw).ok()? {
        Value::Object(obj) if obj.contains_key("message") || obj.contains_key("level") => {
            Some(line_from(obj))
        }
        _ => None,
    }
}

fn line_from(mut obj: Map<String, Value>) -> Line {
    let level = Level::parse(
        obj.remove("level")
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or(""),
    );
    let message = match obj.remove("message") {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    // Our own timestamp is on the event already.
    obj.remove("time");
    Line {
        level,
        message,
        fields: obj,
    }
}

/// `"level":"warn"` inside a fragment, if it is there whole.
fn fragment_level(raw: &str) -> Option<Level> {
    let rest = &raw[raw.find("\"level\":\"")? + 9..];
    Some(Level::parse(&rest[..rest.find('"')?]))
}

/// The events the supervisor acts on, read from a whole JSON line only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `Registered tunnel connection`: the edge accepted the token on one connection.
    Registered,
    /// `Register tunnel error from server side` with an `Unauthorized` error: the edge
    /// refused the token on one registration attempt. cloudflared writes a second line for
    /// the same refusal (`failed to serve incoming request`), which is not counted.
    RegistrationRefused(String),
    /// `Error opening metrics server listener` with `address already in use`: the loopback
    /// port chosen for it was taken between choosing and binding, and cloudflared exits.
    MetricsPortTaken,
}

/// Classifies a whole event by its fixed message and structured `error` field.
pub fn classify(line: &Line) -> Option<Event> {
    match line.message.as_str() {
        "Registered tunnel connection" => Some(Event::Registered),
        "Error opening metrics server listener" => line
            .field_str("error")?
            .contains("address already in use")
            .then_some(Event::MetricsPortTaken),
        "Register tunnel error from server side" => {
            let err = line.field_str("error")?;
            err.starts_with("Unauthorized")
                .then(|| Event::RegistrationRefused(err.to_string()))
        }
        _ => None,
    }
}

/// A stable name for the events an operator filters on (`F_CLOUDFLARED_EVENT=...`).
fn event_name(message: &str) -> Option<&'static str> {
    Some(match message {
        "Starting tunnel" => "starting",
        "Registered tunnel connection" => "registered",
        "Unregistered tunnel connection" => "unregistered",
        "Register tunnel error from server side" => "registration_error",
        "Lost connection with the edge" => "connection_lost",
        "Serve tunnel error" => "serve_error",
        "Connection terminated" => "connection_terminated",
        "Initiating graceful shutdown due to signal terminated ..."
        | "Initiating graceful shutdown due to signal interrupt ..." => "shutdown",
        "no more connections active and exiting" => "exiting",
        "Tunnel server stopped" => "stopped",
        _ => return None,
    })
}

/// The severity an operator should see. cloudflared logs some routine events at error
/// level; those are mapped to what they mean (the table in docs/CLOUDFLARED.md). Unknown
/// events keep cloudflared's level.
pub fn severity(line: &Line) -> Level {
    let err = line.field_str("error");
    match line.message.as_str() {
        // Each connection's end. With an error it was lost (cloudflared reconnects by
        // itself: a warning); without one it is the end of a graceful shutdown.
        "Connection terminated" => match err {
            Some(_) => Level::Warn,
            None => Level::Info,
        },
        // The last line of every graceful shutdown.
        "no more connections active and exiting" => Level::Info,
        // The control stream of a dropped connection being torn down.
        "failed to serve incoming request"
            if err.is_some_and(|e| e.ends_with("context canceled")) =>
        {
            Level::Info
        }
        // ICMP proxying is not used by the appliance (it carries HTTP only); cloudflared
        // warns about it at every start as root or outside the ping group range.
        "ICMP proxy feature is disabled" => Level::Info,
        m if m.starts_with("The user running cloudflared process has a GID") => Level::Info,
        _ => line.level,
    }
}

/// cloudflared fields that get their own structured field; the rest go to
/// `cloudflared_fields` as JSON.
const KNOWN: [&str; 9] = [
    "connIndex",
    "connection",
    "event",
    "ip",
    "location",
    "protocol",
    "error",
    "tunnelID",
    "connectorID",
];

/// Emits one line of cloudflared output, returning the classified event of a whole line.
pub fn emit(raw: &str, stream: &'static str) -> Option<Event> {
    let raw = raw.trim_end();
    if raw.is_empty() {
        return None;
    }
    match parse(raw) {
        Parsed::Whole(line) => {
            emit_line(&line, None);
            classify(&line)
        }
        Parsed::Recovered { line, rest } => {
            emit_line(&line, Some(&rest));
            None
        }
        Parsed::Fragment { level, text } => {
            let level = level.unwrap_or(Level::Info);
            let t = text.as_str();
            match level {
                Level::Debug => debug!(target: "cloudflared", spliced = true, stream, "{t}"),
                Level::Info => info!(target: "cloudflared", spliced = true, stream, "{t}"),
                Level::Warn => warn!(target: "cloudflared", spliced = true, stream, "{t}"),
                Level::Error => error!(target: "cloudflared", spliced = true, stream, "{t}"),
            }
            None
        }
        Parsed::Plain(text) => {
            info!(target: "cloudflared", stream, "{text}");
            None
        }
    }
}

fn emit_line(line: &Line, spliced_rest: Option<&str>) {
    let s = |k: &str| line.fields.get(k).map(plain);
    let conn_index = line.fields.get("connIndex").and_then(Value::as_i64);
    let conn_event = line.fields.get("event").and_then(Value::as_i64);
    let (connection, ip, location, protocol, err, tunnel_id, connector_id) = (
        s("connection"),
        s("ip"),
        s("location"),
        s("protocol"),
        s("error"),
        s("tunnelID"),
        s("connectorID"),
    );
    let rest: Map<String, Value> = line
        .fields
        .iter()
        .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let rest = (!rest.is_empty()).then(|| Value::Object(rest).to_string());
    let event = event_name(&line.message);
    let original = match line.level {
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    };
    let m = line.message.as_str();
    macro_rules! at {
        ($mac:ident) => {
            $mac!(
                target: "cloudflared",
                cloudflared_event = event,
                cloudflared_level = original,
                cloudflared_conn_index = conn_index,
                cloudflared_conn_event = conn_event,
                cloudflared_connection = connection.as_deref(),
                cloudflared_ip = ip.as_deref(),
                cloudflared_location = location.as_deref(),
                cloudflared_protocol = protocol.as_deref(),
                cloudflared_error = err.as_deref(),
                cloudflared_tunnel_id = tunnel_id.as_deref(),
                cloudflared_connector_id = connector_id.as_deref(),
                cloudflared_fields = rest.as_deref(),
                spliced = spliced_rest.map(|_| true),
                spliced_fragment = spliced_rest,
                "{m}"
            )
        };
    }
    match severity(line) {
        Level::Debug => at!(debug),
        Level::Info => at!(info),
        Level::Warn => at!(warn),
        Level::Error => at!(error),
    }
}

/// A JSON value as text without quotes for strings.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(raw: &str) -> Line {
        match parse(raw) {
            Parsed::Whole(l) => l,
            other => panic!("{raw}: {other:?}"),
        }
    }

    // Lines as the real cloudflared 2026.8.2 wrote them against fake-edge (docs/CLOUDFLARED.md).
    const REFUSED: &str = r#"{"connIndex":0,"error":"Unauthorized: Failed to get tunnel","event":0,"ip":"127.0.0.1","level":"error","message":"Register tunnel error from server side","time":"2026-11-30T08:44:20Z"}"#;
    const REFUSED_SECOND: &str = r#"{"error":"Unauthorized: Failed to get tunnel","level":"error","message":"failed to serve incoming request","time":"2026-11-30T08:44:20Z"}"#;
    const REGISTERED: &str = r#"{"connIndex":2,"connection":"50c9c10c-7886-49a7-9606-8c8288bfd097","event":0,"ip":"127.0.0.1","level":"info","location":"LOC","message":"Registered tunnel connection","protocol":"http2","time":"2026-11-30T08:43:45Z"}"#;

    #[test]
    fn one_refused_registration_is_one_event() {
        assert_eq!(
            classify(&whole(REFUSED)),
            Some(Event::RegistrationRefused(
                "Unauthorized: Failed to get tunnel".into()
            ))
        );
        assert_eq!(classify(&whole(REFUSED_SECOND)), None);
        assert_eq!(classify(&whole(REGISTERED)), Some(Event::Registered));
    }

    #[test]
    fn a_taken_metrics_port_is_an_event_other_listener_errors_are_not() {
        // As cloudflared 2026.8.2 wrote it when another socket held the port.
        let taken = r#"{"error":"failed to bind to address (127.0.0.1:45077): listen tcp 127.0.0.1:45077: bind: address already in use","level":"error","message":"Error opening metrics server listener","time":"2026-11-30T15:01:01Z"}"#;
        assert_eq!(classify(&whole(taken)), Some(Event::MetricsPortTaken));
        let denied = r#"{"error":"listen tcp 127.0.0.1:80: bind: permission denied","level":"error","message":"Error opening metrics server listener","time":"x"}"#;
        assert_eq!(classify(&whole(denied)), None);
    }

    #[test]
    fn caller_controlled_text_never_classifies() {
        // cloudflared at debug level logs request paths; none of these is a refusal.
        for raw in [
            r#"{"level":"debug","message":"GET https://echo.t.test/admin/unauthorized HTTP/1.1","time":"x"}"#,
            r#"{"level":"error","message":"Request failed","error":"Unauthorized: Failed to get tunnel","path":"/unauthorized"}"#,
            r#"{"level":"error","message":"Register tunnel error from server side","error":"connection reset"}"#,
            "Register tunnel error from server side error=\"Unauthorized: Failed to get tunnel\"",
        ] {
            let got = match parse(raw) {
                Parsed::Whole(l) => classify(&l),
                _ => None,
            };
            assert_eq!(got, None, "{raw}");
        }
    }

    #[test]
    fn spliced_lines_resynchronise_keep_their_level_and_never_classify() {
        // Two events written at the same instant (observed on a drop of all connections).
        let head = r#"{"connIndex":1{"connIndex":0,"error":"Unauthorized: Failed to get tunnel","event":0,"ip":"127.0.0.1","level":"error","message":"Register tunnel error from server side","time":"2026-11-30T08:44:20Z"}"#;
        match parse(head) {
            Parsed::Recovered { line, rest } => {
                assert_eq!(line.level, Level::Error);
                assert_eq!(line.message, "Register tunnel error from server side");
                assert_eq!(rest, r#"{"connIndex":1"#);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            emit(head, "stderr"),
            None,
            "a spliced line never classifies"
        );
        let tail = r#","level":"warn","message":"Lost connection with the edge","time":"2026-11-30T08:44:04Z"}"#;
        assert_eq!(
            parse(tail),
            Parsed::Fragment {
                level: Some(Level::Warn),
                text: tail.into()
            }
        );
        assert_eq!(
            parse(r#""connIndex":3,"#),
            Parsed::Fragment {
                level: None,
                text: r#""connIndex":3,"#.into()
            }
        );
        assert_eq!(
            parse("Provided Tunnel token is not valid."),
            Parsed::Plain("Provided Tunnel token is not valid.".into())
        );
    }

    #[test]
    fn routine_events_get_their_real_severity() {
        let cases = [
            (
                r#"{"connIndex":3,"error":"connection with edge closed","level":"error","message":"Connection terminated"}"#,
                Level::Warn,
            ),
            (
                r#"{"connIndex":3,"level":"error","message":"Connection terminated"}"#,
                Level::Info,
            ),
            (
                r#"{"level":"error","message":"no more connections active and exiting"}"#,
                Level::Info,
            ),
            (
                r#"{"error":"Error shutting down control stream: context canceled","level":"error","message":"failed to serve incoming request"}"#,
                Level::Info,
            ),
            (REFUSED_SECOND, Level::Error),
            (REFUSED, Level::Error),
            (
                r#"{"level":"error","message":"something new"}"#,
                Level::Error,
            ),
            (REGISTERED, Level::Info),
        ];
        for (raw, want) in cases {
            assert_eq!(severity(&whole(raw)), want, "{raw}");
        }
    }

    #[test]
    fn fields_are_kept_apart_from_level_message_and_time() {
        let l = whole(REGISTERED);
        assert_eq!(l.level, Level::Info);
        assert_eq!(l.message, "Registered tunnel connection");
        assert_eq!(l.fields["connIndex"], 2);
        assert!(!l.fields.contains_key("time") && !l.fields.contains_key("level"));
        assert!(matches!(
            parse("[1,2]"),
            Parsed::Plain(_) | Parsed::Fragment { .. }
        ));
        assert!(matches!(
            parse("2026-01-01T00:00:00Z INF Starting tunnel"),
            Parsed::Plain(_)
        ));
    }
}

//! cloudflared's log lines (`--output json`) re-emitted through tracing under target
//! `cloudflared`, so they land in the same journal with levels that filter properly.

use tracing::{debug, error, info, warn};

/// One parsed line.
#[derive(Debug, PartialEq)]
pub struct Line {
    pub level: Level,
    pub message: String,
    /// The remaining fields as compact JSON (`{"connIndex":0,...}`), empty if none.
    pub fields: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Parses a JSON log line; `None` for anything else (passed through as is).
pub fn parse(line: &str) -> Option<Line> {
    let serde_json::Value::Object(mut obj) = serde_json::from_str(line.trim()).ok()? else {
        return None;
    };
    let level = match obj.remove("level").as_ref().and_then(|v| v.as_str()) {
        Some("debug" | "trace") => Level::Debug,
        Some("warn" | "warning") => Level::Warn,
        Some("error" | "fatal" | "panic") => Level::Error,
        _ => Level::Info,
    };
    let message = match obj.remove("message") {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    // Our own timestamp is on the event already.
    obj.remove("time");
    let fields = if obj.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(obj).to_string()
    };
    Some(Line {
        level,
        message,
        fields,
    })
}

/// Emits one line of cloudflared output.
pub fn emit(raw: &str, stream: &'static str) {
    let raw = raw.trim_end();
    if raw.is_empty() {
        return;
    }
    match parse(raw) {
        Some(l) => {
            let (m, f) = (l.message.as_str(), l.fields.as_str());
            match l.level {
                Level::Debug => debug!(target: "cloudflared", fields = f, "{m}"),
                Level::Info => info!(target: "cloudflared", fields = f, "{m}"),
                Level::Warn => warn!(target: "cloudflared", fields = f, "{m}"),
                Level::Error => error!(target: "cloudflared", fields = f, "{m}"),
            }
        }
        None => info!(target: "cloudflared", stream, "{raw}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_map_level_message_and_fields() {
        let l = parse(r#"{"level":"info","time":"2026-01-01T00:00:00Z","connIndex":2,"message":"Registered tunnel connection","protocol":"quic"}"#).unwrap();
        assert_eq!(l.level, Level::Info);
        assert_eq!(l.message, "Registered tunnel connection");
        assert_eq!(l.fields, r#"{"connIndex":2,"protocol":"quic"}"#);
        assert_eq!(
            parse(r#"{"level":"fatal","message":"x"}"#).unwrap().level,
            Level::Error
        );
        assert_eq!(
            parse(r#"{"level":"warn","message":"x"}"#).unwrap().fields,
            ""
        );
        assert!(parse("2026-01-01T00:00:00Z INF Starting tunnel").is_none());
        assert!(parse("[1,2]").is_none());
    }
}

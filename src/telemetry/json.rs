//! `log_format = "json"`: one JSON object per line on stderr, for hosts without a journal
//! that ship stderr to a collector. The keys are the journal's own, as `journalctl -o json`
//! prints them for this service (`MESSAGE`, `PRIORITY`, `TARGET`, `CODE_FILE`, `CODE_LINE`,
//! `SYSLOG_IDENTIFIER`, `F_<FIELD>` per event field, `__REALTIME_TIMESTAMP` in microseconds),
//! all values strings, so one query or collector rule reads both.

use std::fmt;
use std::io::Write;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Writes each event as one JSON line to a writer (stderr in the service).
pub struct JsonLayer<W> {
    make_writer: W,
}

impl<W> JsonLayer<W>
where
    W: Fn(&tracing::Metadata<'_>) -> Box<dyn Write> + Send + Sync + 'static,
{
    pub fn new(make_writer: W) -> JsonLayer<W> {
        JsonLayer { make_writer }
    }
}

/// The journal's PRIORITY for a level, as tracing-journald maps it by default.
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "5",
        Level::DEBUG => "6",
        Level::TRACE => "7",
    }
}

/// A journal field name: `.` becomes `_`, leading `_` and anything but `[A-Za-z0-9_]`
/// dropped, upper case (what the journal accepts, and what tracing-journald writes).
pub(super) fn journal_name(name: &str) -> String {
    name.chars()
        .map(|c| if c == '.' { '_' } else { c })
        .skip_while(|&c| c == '_')
        .filter(|&c| c == '_' || c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: String) {
        let key = if field.name() == "message" {
            "MESSAGE".to_string()
        } else {
            format!("F_{}", journal_name(field.name()))
        };
        self.0.insert(key, Value::String(value));
    }
}

/// The line for one event at `micros` (Unix microseconds), without the newline.
pub fn line(event: &Event<'_>, micros: u128) -> String {
    let meta = event.metadata();
    let mut m = Map::new();
    m.insert("__REALTIME_TIMESTAMP".into(), micros.to_string().into());
    m.insert("PRIORITY".into(), priority(meta.level()).into());
    m.insert("SYSLOG_IDENTIFIER".into(), "mcp-tunnel".into());
    m.insert("TARGET".into(), meta.target().into());
    if let Some(file) = meta.file() {
        m.insert("CODE_FILE".into(), file.into());
    }
    if let Some(line) = meta.line() {
        m.insert("CODE_LINE".into(), line.to_string().into());
    }
    event.record(&mut Fields(&mut m));
    Value::Object(m).to_string()
}

/// A notice of the log pipeline's own (lines were dropped) as one JSON line.
pub fn notice(text: &str) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut m = Map::new();
    m.insert("__REALTIME_TIMESTAMP".into(), micros.to_string().into());
    m.insert("PRIORITY".into(), "4".into());
    m.insert("SYSLOG_IDENTIFIER".into(), "mcp-tunnel".into());
    m.insert("TARGET".into(), "mcp_tunnel::telemetry".into());
    m.insert("MESSAGE".into(), text.into());
    let mut line = Value::Object(m).to_string();
    line.push('\n');
    line
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber,
    W: Fn(&tracing::Metadata<'_>) -> Box<dyn Write> + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let mut text = line(event, micros);
        text.push('\n');
        // One write per line, so that lines from several threads never interleave.
        let _ = (self.make_writer)(event.metadata()).write_all(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::prelude::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_object_per_line_with_the_journal_keys() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(JsonLayer::new(
            move |_: &tracing::Metadata<'_>| Box::new(w.clone()) as Box<dyn Write>,
        ));
        tracing::subscriber::with_default(sub, || {
            tracing::info!(
                route = "echo",
                status = 502u16,
                "request \"completed\"\nsecond line"
            );
            tracing::warn!(listen.addr = %"127.0.0.1:8080", "proxy listening");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let a: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(a["MESSAGE"], "request \"completed\"\nsecond line");
        assert_eq!(a["PRIORITY"], "5");
        assert_eq!(a["F_ROUTE"], "echo");
        assert_eq!(a["F_STATUS"], "502");
        assert_eq!(a["SYSLOG_IDENTIFIER"], "mcp-tunnel");
        assert!(a["TARGET"].as_str().unwrap().starts_with("mcp_tunnel"));
        assert!(a["CODE_FILE"].as_str().unwrap().ends_with("json.rs"));
        assert!(a["CODE_LINE"].as_str().unwrap().parse::<u32>().is_ok());
        assert!(
            a["__REALTIME_TIMESTAMP"]
                .as_str()
                .unwrap()
                .parse::<u128>()
                .unwrap()
                > 1_600_000_000_000_000
        );
        let b: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(
            (b["PRIORITY"].as_str(), b["F_LISTEN_ADDR"].as_str()),
            (Some("4"), Some("127.0.0.1:8080"))
        );
    }

    #[test]
    fn journal_names() {
        assert_eq!(journal_name("listen.addr"), "LISTEN_ADDR");
        assert_eq!(journal_name("_private"), "PRIVATE");
        assert_eq!(journal_name("duration_ms"), "DURATION_MS");
        assert_eq!(journal_name("a-b"), "AB");
    }
}

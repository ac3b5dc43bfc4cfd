//! Logging, metrics and the admin endpoint.
//!
//! Logs (`log_format = "auto"`, the default) go to journald with structured fields when stderr
//! is the journal (sent from the log thread, never from a request's: [`journal`]) (systemd sets `JOURNAL_STREAM` to stderr's device:inode), otherwise
//! human-readable to stderr; `"text"` forces the latter, `"json"` writes one JSON object per
//! line to stderr with the journal's field names ([`json`]). The level comes from
//! `log_level`; `RUST_LOG` refines it.

pub mod admin;
pub mod journal;
pub mod json;
pub mod metrics;
pub mod page;
pub mod restart_connector;
pub mod status;
pub mod writer;

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber (`log_format = "auto"`) writing straight to stderr; a
/// second call is a no-op (tests start several proxies). For short-lived commands.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// The service's subscriber, in the configured format. Every sink is written from the log
/// thread ([`writer::BatchWriter`]: one write per batch, a bounded queue, drops counted), so
/// no request thread ever waits on stderr or journald; the returned guard writes out what is
/// queued when dropped, so hold it until exit.
pub fn init_with(level: &str, format: LogFormat) -> Option<writer::LogGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| service_filter(level));
    if format == LogFormat::Json {
        let (w, guard) =
            writer::BatchWriter::new(writer::StreamSink::new(std::io::stderr(), json::notice));
        let layer = json::JsonLayer::new(move |meta: &tracing::Metadata<'_>| {
            Box::new(w.line(writer::Kind::of(meta.target()))) as Box<dyn std::io::Write>
        });
        return tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .ok()
            .map(|()| guard);
    }
    if format == LogFormat::Auto
        && stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref())
        && let Ok(sink) = journal::JournalSink::new(journal::SOCKET)
    {
        let (w, guard) = writer::BatchWriter::new(sink);
        return tracing_subscriber::registry()
            .with(filter)
            .with(journal::JournalLayer::new(w))
            .try_init()
            .ok()
            .map(|()| guard);
    }
    let (w, guard) = writer::BatchWriter::stderr();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(w)
        // Colour codes only for a person at a terminal, not in files or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init()
        .ok()
        .map(|()| guard)
}

/// `log_level` for everything but the MCP audit trail, which stays on at `info` whatever the
/// level: a security team's record must not vanish because an operator quietened the log
/// (`RUST_LOG=...,mcp_audit=off` silences it on purpose).
fn service_filter(level: &str) -> EnvFilter {
    EnvFilter::new(format!("{level},{}=info", crate::proxy::mcp::AUDIT_TARGET))
}

/// `JOURNAL_STREAM=<dev>:<ino>` names the stream systemd connected; it only counts if
/// stderr is still that stream (not redirected by a wrapper).
fn stderr_is_journal(var: Option<&str>) -> bool {
    let Some((dev, ino)) = var.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

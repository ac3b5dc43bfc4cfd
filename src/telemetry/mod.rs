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
pub mod limiter;
pub mod metrics;
pub mod page;
pub mod restart_connector;
pub mod status;
pub mod writer;

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::Filter;
use tracing_subscriber::{EnvFilter, Registry};

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
/// queued when dropped, so hold it until exit. The level is `log_level`, changed live by a
/// reload ([`set_level`]), unless `RUST_LOG` is set: its directives then decide, fixed.
pub fn init_with(level: &str, format: LogFormat) -> Option<writer::LogGuard> {
    let filter = service_filter(level);
    if format == LogFormat::Json {
        let (w, guard) =
            writer::BatchWriter::new(writer::StreamSink::new(std::io::stderr(), json::notice));
        let layer = json::JsonLayer::new(move |meta: &tracing::Metadata<'_>| {
            Box::new(w.line(writer::Kind::of(meta.target()))) as Box<dyn std::io::Write>
        });
        return tracing_subscriber::registry()
            .with(layer.with_filter(filter))
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
            .with(journal::JournalLayer::new(w).with_filter(filter))
            .try_init()
            .ok()
            .map(|()| guard);
    }
    let (w, guard) = writer::BatchWriter::stderr();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(w)
        // Colour codes only for a person at a terminal, not in files or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .ok()
        .map(|()| guard)
}

type ServiceFilter = Box<dyn Filter<Registry> + Send + Sync + 'static>;

/// `RUST_LOG`'s directives when it is set; otherwise `log_level`, live.
fn service_filter(level: &str) -> ServiceFilter {
    if let Ok(env) = EnvFilter::try_from_default_env() {
        return Box::new(env);
    }
    LIVE.store(true, Ordering::Relaxed);
    LEVEL.store(level_code(level), Ordering::Relaxed);
    Box::new(LiveLevel)
}

/// Whether `log_level` decides (no `RUST_LOG`), and the level it gives (0 error .. 4 trace).
static LIVE: AtomicBool = AtomicBool::new(false);
static LEVEL: AtomicU8 = AtomicU8::new(2);

fn level_code(level: &str) -> u8 {
    match level {
        "error" => 0,
        "warn" => 1,
        "debug" => 3,
        "trace" => 4,
        _ => 2,
    }
}

fn level_filter(code: u8) -> LevelFilter {
    [
        LevelFilter::ERROR,
        LevelFilter::WARN,
        LevelFilter::INFO,
        LevelFilter::DEBUG,
        LevelFilter::TRACE,
    ][usize::from(code.min(4))]
}

/// Why a new `log_level` was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelNotApplied {
    /// `RUST_LOG` is set: its directives decide, for the life of the process.
    RustLog,
}

/// Applies a `log_level` from a reload, from the next event on. tracing caches each
/// callsite's verdict (no check per event), so the cache is rebuilt.
pub fn set_level(level: &str) -> Result<(), LevelNotApplied> {
    if !LIVE.load(Ordering::Relaxed) {
        return Err(LevelNotApplied::RustLog);
    }
    LEVEL.store(level_code(level), Ordering::Relaxed);
    tracing::callsite::rebuild_interest_cache();
    Ok(())
}

/// `log_level` for everything but the MCP audit trail, which stays on at `info` whatever the
/// level: a security team's record must not vanish because an operator quietened the log
/// (`RUST_LOG=...,mcp_audit=off` silences it on purpose).
struct LiveLevel;

impl LiveLevel {
    fn allows(meta: &Metadata<'_>) -> bool {
        let mut level = level_filter(LEVEL.load(Ordering::Relaxed));
        if meta.target() == crate::proxy::mcp::AUDIT_TARGET {
            level = level.max(LevelFilter::INFO);
        }
        level >= *meta.level()
    }
}

impl<S> Filter<S> for LiveLevel {
    fn enabled(&self, meta: &Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        LiveLevel::allows(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if LiveLevel::allows(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(level_filter(LEVEL.load(Ordering::Relaxed)).max(LevelFilter::INFO))
    }
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

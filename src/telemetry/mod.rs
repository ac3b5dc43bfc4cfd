//! Logging setup: tracing to stderr, level from config, `RUST_LOG` for finer control.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call is a no-op (tests start several proxies).
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

//! How each config field takes effect when the file changes while the service runs: applied
//! live by a reload, or only at the next start. Every field of [`Config`] is named here, in
//! both functions, without `..`: a new field does not compile until it is classified, so no
//! change is ever accepted and silently not applied. docs/LIFECYCLE.md's table of live
//! changes is checked against [`RESTART_ONLY`] by a test.

use super::{CloudflaredConfig, Config};

/// The fields a reload cannot apply, as an operator writes them in the file.
pub const RESTART_ONLY: [&str; 8] = [
    "listen_addr",
    "log_format",
    "workers",
    "allow_readable_secrets",
    "[limits]",
    "[admin]",
    "[peer_check]",
    "[provision]",
];

/// `cloudflared.enabled`: whether the service supervises cloudflared at all is fixed at
/// start; every other `[cloudflared]` field replaces the connector.
pub const CLOUDFLARED_ENABLED: &str = "cloudflared.enabled";

/// The restart-only fields whose value in `new` differs from the running `old`, in the
/// order of [`RESTART_ONLY`] (and `cloudflared.enabled` last).
pub fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let Config {
        path: _,
        listen_addr,
        log_level: _,
        log_format,
        shutdown_timeout: _,
        tunnel_domain: _,
        tls: _,
        routes: _,
        upstream: _,
        cloudflared,
        certs: _,
        provision,
        admin,
        limits,
        mcp: _,
        allow_readable_secrets,
        peer_check,
        workers,
    } = new;
    let mut out = Vec::new();
    let mut differs = |name: &'static str, same: bool| {
        if !same {
            out.push(name);
        }
    };
    differs("listen_addr", *listen_addr == old.listen_addr);
    differs("log_format", *log_format == old.log_format);
    differs("workers", *workers == old.workers);
    differs(
        "allow_readable_secrets",
        *allow_readable_secrets == old.allow_readable_secrets,
    );
    differs("[limits]", *limits == old.limits);
    differs("[admin]", *admin == old.admin);
    differs("[peer_check]", *peer_check == old.peer_check);
    differs("[provision]", *provision == old.provision);
    differs(
        CLOUDFLARED_ENABLED,
        cloudflared.enabled == old.cloudflared.enabled,
    );
    out
}

/// What a reload applies: `new`'s live fields with `running`'s restart-only ones (which stay
/// until the next start). With `cloudflared.enabled` changed, the whole `[cloudflared]`
/// section stays (a section for a connector that is not supervised, or that must stop, is
/// not one the running connector can take).
pub fn live_part(running: &Config, new: Config) -> Config {
    let Config {
        path,
        listen_addr: _,
        log_level,
        log_format: _,
        shutdown_timeout,
        tunnel_domain,
        tls,
        routes,
        upstream,
        cloudflared,
        certs,
        provision: _,
        admin: _,
        limits: _,
        mcp,
        allow_readable_secrets: _,
        peer_check: _,
        workers: _,
    } = new;
    let cloudflared: CloudflaredConfig = if cloudflared.enabled == running.cloudflared.enabled {
        cloudflared
    } else {
        running.cloudflared.clone()
    };
    Config {
        path,
        listen_addr: running.listen_addr,
        log_level,
        log_format: running.log_format,
        shutdown_timeout,
        tunnel_domain,
        tls,
        routes,
        upstream,
        cloudflared,
        certs,
        provision: running.provision.clone(),
        admin: running.admin.clone(),
        limits: running.limits.clone(),
        mcp,
        allow_readable_secrets: running.allow_readable_secrets,
        peer_check: running.peer_check,
        workers: running.workers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(
            std::path::Path::new("/etc/mcp-tunnel/mcp-tunnel.toml"),
            text,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A config with `top` lines before the first section and `sections` after `[tls]`.
    fn with(top: &str, sections: &str) -> Config {
        parse(&format!(
            "listen_addr = \"127.0.0.1:8080\"\ntunnel_domain = \"t.example\"\n{top}\n[tls]\ncert_file = \"/x/tls.crt\"\nkey_file = \"/x/tls.key\"\n{sections}\n[routes]\necho = \"http://10.0.0.5:9000\"\n"
        ))
    }

    #[test]
    fn every_restart_only_field_that_differs_is_named_and_kept() {
        let old = with("", "");
        let new = parse(
            "listen_addr = \"127.0.0.1:9090\"\ntunnel_domain = \"t.example\"\nlog_format = \"json\"\nworkers = 3\n[tls]\ncert_file = \"/x/tls.crt\"\nkey_file = \"/x/tls.key\"\n[limits]\nmax_sessions = 7\n[routes]\necho = \"http://10.0.0.5:9000\"\n",
        );
        assert_eq!(
            restart_required(&old, &new),
            ["listen_addr", "log_format", "workers", "[limits]"]
        );
        let applied = live_part(&old, new);
        assert_eq!(applied.listen_addr, old.listen_addr);
        assert_eq!(applied.log_format, old.log_format);
        assert_eq!(applied.workers, old.workers);
        assert_eq!(applied.limits, old.limits);
        assert!(restart_required(&old, &applied).is_empty());
    }

    #[test]
    fn live_fields_pass_and_need_no_restart() {
        let old = with("", "");
        let new = with(
            "log_level = \"debug\"\nshutdown_timeout = \"3s\"",
            "[certs]\ncheck_interval = \"1m\"",
        );
        assert_ne!(old, new);
        assert!(restart_required(&old, &new).is_empty());
        assert_eq!(live_part(&old, new.clone()), new);
    }

    #[test]
    fn cloudflared_enabled_keeps_the_running_section() {
        let old = with("", "[cloudflared]\nenabled = false");
        let new = with("", "[cloudflared]\nenabled = true\ngrace_period = \"3s\"");
        // `[peer_check]` defaults to on with a supervised cloudflared: it changes with it.
        assert_eq!(
            restart_required(&old, &new),
            ["[peer_check]", CLOUDFLARED_ENABLED]
        );
        assert_eq!(live_part(&old, new).cloudflared, old.cloudflared);
    }

    /// docs/LIFECYCLE.md's table of live changes names every restart-only field as such.
    #[test]
    fn the_lifecycle_table_lists_every_restart_only_field() {
        let doc = include_str!("../../docs/LIFECYCLE.md");
        let (_, table) = doc
            .split_once("### What a live change does")
            .expect("LIFECYCLE.md has the table");
        for f in RESTART_ONLY.iter().chain([&CLOUDFLARED_ENABLED]) {
            let row = format!("| `{f}` | restart |");
            assert!(table.contains(&row), "LIFECYCLE.md lacks `{row}`");
        }
    }
}

//! The config file: parses and validates (the rules of `check`), secret file modes, upstream
//! trust, and the tunnel domain.

use std::path::Path;

use super::{Check, mode};
use crate::certs::perms;
use crate::config::Config;

/// Runs the config checks; `None` when the file is unusable (nothing else can be checked).
pub(super) fn checks(path: &Path, out: &mut Vec<Check>) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                out.push(Check::fail(
                    "config",
                    format!("{}: {}: {}", e.file.display(), p.field, p.message),
                    format!(
                        "edit {} ({}); `mcp-tunnel check --config {}` lists every problem",
                        e.file.display(),
                        p.field,
                        e.file.display()
                    ),
                ));
            }
            return None;
        }
    };
    out.push(
        Check::ok(
            "config",
            format!(
                "{} parses and validates: {} route{}, listen_addr {}",
                path.display(),
                config.routes.len(),
                if config.routes.len() == 1 { "" } else { "s" },
                config.listen_addr
            ),
        )
        .fact("routes", config.routes.len())
        .fact("listen_addr", config.listen_addr.to_string()),
    );
    out.push(secrets(&config));
    out.push(match crate::proxy::tls::upstream_client_config(&config.upstream) {
        Ok(_) => Check::ok(
            "config.upstream_tls",
            match (&config.upstream.ca_file, config.upstream.include_system_cas) {
                (None, false) => "no upstream trust configured (only http:// upstreams)".into(),
                (Some(f), sys) => format!(
                    "https upstreams trust {}{}",
                    f.display(),
                    if sys { " and the system store" } else { "" }
                ),
                (None, true) => "https upstreams trust the system store".into(),
            },
        ),
        Err(e) => Check::fail(
            "config.upstream_tls",
            e.to_string(),
            "point upstream.tls.ca_file at a PEM file holding the CA that signed the upstreams' certificates",
        ),
    });
    out.push(tunnel_domain(&config));
    Some(config)
}

/// The private keys must be owner-only (`run` refuses to start otherwise).
fn secrets(config: &Config) -> Check {
    let mut files = vec![("tls.key_file", config.tls.key_file.clone())];
    if let Some(k) = &config.certs.ca_key_file {
        files.push(("certs.ca_key_file", k.clone()));
    }
    let mut seen = Vec::new();
    for (field, path) in &files {
        // Loose modes are allowed on purpose with allow_readable_secrets; still say so.
        if let Err(e) = perms::check_secret(field, path, false) {
            if config.allow_readable_secrets {
                return Check::warn(
                    "config.secrets",
                    format!(
                        "{field} ({}) is readable by group or others (mode {:04o}); allowed by allow_readable_secrets = true",
                        e.path, e.mode
                    ),
                    format!(
                        "chmod 600 {} and remove allow_readable_secrets unless a container setup needs it",
                        e.path
                    ),
                );
            }
            return Check::fail(
                "config.secrets",
                format!(
                    "{field} ({}) is readable by group or others (mode {:04o}): `run` refuses to start",
                    e.path, e.mode
                ),
                format!(
                    "chmod 600 {} (or set allow_readable_secrets = true if a container setup needs it)",
                    e.path
                ),
            );
        }
        if let Some(m) = mode(path) {
            seen.push(format!("{field} {m:04o}"));
        }
    }
    Check::ok(
        "config.secrets",
        if seen.is_empty() {
            "no key file to check yet".to_string()
        } else {
            format!("owner-only: {}", seen.join(", "))
        },
    )
}

/// The domain the edge sends names under; compared with a `tunnel-domain` file beside the
/// certificate (written by `certs init` and `setup`), the reference's "no route for host".
fn tunnel_domain(config: &Config) -> Check {
    let Some(domain) = &config.tunnel_domain else {
        return Check::warn(
            "config.tunnel_domain",
            "tunnel_domain is not set: only routes keyed by their full hostname can match, and the certificate's names cannot be checked",
            "set tunnel_domain to the domain on the tunnel's detail page (Console > Manage > MCP tunnels)",
        );
    };
    let stored_at = config
        .tls
        .cert_file
        .parent()
        .map(|d| d.join("tunnel-domain"));
    if let Some(file) = stored_at
        && let Ok(text) = std::fs::read_to_string(&file)
    {
        let stored = crate::config::routes::normalize_name(text.trim());
        if !stored.is_empty() && stored != *domain {
            return Check::fail(
                "config.tunnel_domain",
                format!(
                    "tunnel_domain {domain:?} differs from {stored:?} in {} (the domain the certificate was issued for): the edge sends names under the tunnel's domain, so requests get `no route for host`",
                    file.display()
                ),
                format!(
                    "set tunnel_domain = \"{stored}\" (the domain on the tunnel's detail page)"
                ),
            );
        }
    }
    Check::ok("config.tunnel_domain", format!("tunnel_domain {domain}"))
        .fact("tunnel_domain", domain.as_str())
}

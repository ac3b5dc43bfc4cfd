//! The inner-TLS server certificate and its CA: every step of the preflight `run` applies
//! (each reported on its own), the CA's upload rules, and with `[provision]` whether the CA
//! is registered and active on the tunnel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use super::{Check, Env, Options};
use crate::certs::preflight::{self, CertFacts, PreflightError};
use crate::certs::{self, CertError};
use crate::config::Config;

/// What the certificate checks found, for the route probes.
pub(super) struct CertContext {
    /// The pair as `run` would load it (key matches), when it loads.
    pub pair: Option<Arc<CertifiedKey>>,
    /// The CA the edge must trust, when one was found.
    pub ca: Option<Ca>,
}

/// The tunnel CA as found on disk.
pub(super) struct Ca {
    pub path: PathBuf,
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER, as the Tunnels API lists it.
    pub fingerprint: Option<String>,
}

/// Where the tunnel CA is: `[certs] ca_cert_file`, the provisioned state directory's, or a
/// `ca.crt` beside the server certificate (the layout `certs init` and `setup` write).
pub(super) fn ca_path(config: &Config) -> Option<(PathBuf, &'static str)> {
    if let Some(p) = &config.certs.ca_cert_file {
        return Some((p.clone(), "certs.ca_cert_file"));
    }
    if let Some(p) = &config.provision {
        return Some((p.state_file("ca.crt"), "the state directory"));
    }
    let beside = config.tls.cert_file.parent()?.join("ca.crt");
    beside
        .exists()
        .then_some((beside, "ca.crt beside tls.cert_file"))
}

/// How to get a new server certificate in this setup: with the CA's pair beside the server
/// certificate (the `certs init` / `setup` layout), the exact `renew-cert` command, which
/// issues for the domain in that directory's `tunnel-domain`.
fn renew_hint(config: &Config) -> String {
    if config.provision.is_some() {
        return "the service renews it itself from the provisioned CA; by hand: `mcp-tunnel setup renew-cert`".into();
    }
    let dir = config.tls.cert_file.parent().unwrap_or(Path::new("."));
    let shown = dir.display();
    if !(dir.join("ca.key").exists() && dir.join("ca.crt").exists()) {
        return format!(
            "issue a new server certificate from the tunnel CA's key (`mcp-tunnel renew-cert --dir DIR`, DIR holding ca.crt, ca.key and tunnel-domain) and write it to {}",
            config.tls.cert_file.display()
        );
    }
    let stored = std::fs::read_to_string(dir.join("tunnel-domain"))
        .ok()
        .map(|d| crate::config::routes::normalize_name(d.trim()));
    match (&config.tunnel_domain, stored) {
        (Some(d), Some(s)) if *d == s => {
            format!("`mcp-tunnel renew-cert --dir {shown}` issues a new one from the tunnel CA")
        }
        (Some(d), _) => format!(
            "`echo {d} > {shown}/tunnel-domain && mcp-tunnel renew-cert --dir {shown}` issues one for {d} and *.{d} from the tunnel CA"
        ),
        (None, _) => format!(
            "set tunnel_domain, write it to {shown}/tunnel-domain, then `mcp-tunnel renew-cert --dir {shown}`"
        ),
    }
}

pub(super) async fn checks(
    config: &Config,
    opts: &Options,
    env: &Env,
    out: &mut Vec<Check>,
) -> CertContext {
    let pair = match certs::load_server_pair(&config.tls) {
        Ok(p) => {
            out.push(Check::ok(
                "certificate.pair",
                format!(
                    "{} and {} load and the key matches the certificate",
                    config.tls.cert_file.display(),
                    config.tls.key_file.display()
                ),
            ));
            Some(p)
        }
        Err(e) => {
            let fix = match &e {
                CertError::Mismatch { .. } => format!(
                    "put the private key of {} into tls.key_file, or issue a new pair: {}",
                    config.tls.cert_file.display(),
                    renew_hint(config)
                ),
                CertError::Read { .. } if config.provision.is_some() => "the state directory is not provisioned yet: start the service (it provisions an empty state directory) or run `mcp-tunnel setup init`".to_string(),
                CertError::Read { path, .. } => format!(
                    "check that {} exists and that the service user can read it",
                    path.display()
                ),
                _ => format!(
                    "replace the file with a PEM certificate and key: {}",
                    renew_hint(config)
                ),
            };
            out.push(Check::fail("certificate.pair", e.to_string(), fix));
            None
        }
    };
    // The remaining steps need only the certificate, so a key problem hides nothing else.
    let leaf = match &pair {
        Some(p) => Some(p.cert[0].clone()),
        None => certs::load_certs("tls.cert_file", &config.tls.cert_file)
            .ok()
            .map(|mut c| c.remove(0)),
    };
    let mut ca_checks = Vec::new();
    let ca = load_ca(config, env.now, &mut ca_checks);
    let Some(leaf) = leaf else {
        out.append(&mut ca_checks);
        return CertContext { pair, ca };
    };
    let facts = match preflight::facts(&leaf) {
        Ok(f) => f,
        Err(e) => {
            out.push(Check::fail(
                "certificate.parse",
                e.to_string(),
                renew_hint(config),
            ));
            out.append(&mut ca_checks);
            return CertContext { pair, ca };
        }
    };
    out.push(validity(config, &facts, env.now));
    out.push(names(config, &facts));
    out.push(match preflight::check_eku(&facts) {
        Ok(()) => Check::ok(
            "certificate.eku",
            match facts.eku_server_auth {
                Some(_) => "extendedKeyUsage includes serverAuth",
                None => "no extendedKeyUsage extension (every use allowed)",
            },
        ),
        Err(e) => Check::fail("certificate.eku", e.to_string(), renew_hint(config)),
    });
    out.push(chain(config, &leaf, ca.as_ref()));
    out.append(&mut ca_checks);
    out.push(registered(config, ca.as_ref(), opts, env).await);
    CertContext { pair, ca }
}

fn validity(config: &Config, f: &CertFacts, now: i64) -> Check {
    let days = (f.not_after - now).div_euclid(86400);
    let until = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(f.not_after.max(0) as u64),
    );
    match preflight::check_validity(f, now) {
        Err(e @ PreflightError::Expired(_)) => Check::fail(
            "certificate.validity",
            format!("{e}: the edge refuses it (`tls handshake failed ... bad certificate`)"),
            renew_hint(config),
        ),
        Err(e) => Check::fail(
            "certificate.validity",
            e.to_string(),
            format!("check the clock (`timedatectl`), or {}", renew_hint(config)),
        ),
        Ok(()) if days < config.certs.renew_before.as_secs() as i64 / 86400 => Check::warn(
            "certificate.validity",
            format!("valid until {until}: {days} days left, renewal is due"),
            renew_hint(config),
        ),
        Ok(()) => Check::ok(
            "certificate.validity",
            format!("valid until {until} ({days} days left)"),
        ),
    }
    .fact("days_left", days)
    .fact("not_after", until.to_string())
}

fn names(config: &Config, f: &CertFacts) -> Check {
    let hosts = config.route_hosts();
    let missing = preflight::uncovered(f, &hosts);
    let routes_of = |missing: &[String]| -> Vec<String> {
        missing
            .iter()
            .filter_map(|h| {
                let i = hosts.iter().position(|x| x == h)?;
                Some(format!("{h} (routes.{})", config.routes[i].name))
            })
            .collect()
    };
    let sans = format!("{:?}", f.dns_names);
    match (
        preflight::check_names(f, config.tunnel_domain.as_deref(), &hosts),
        &config.tunnel_domain,
    ) {
        (Err(_), Some(domain)) => Check::fail(
            "certificate.names",
            format!(
                "SAN {sans} does not cover {}: the edge refuses the handshake for those names (`bad certificate`)",
                routes_of(&missing).join(", ")
            ),
            format!(
                "issue the server certificate for {domain} and *.{domain}: {}",
                renew_hint(config)
            ),
        )
        .fact("uncovered", missing),
        (Ok(()), Some(domain)) => Check::ok(
            "certificate.names",
            if f.dns_names.contains(&format!("*.{domain}")) {
                format!("SAN {sans} covers *.{domain}")
            } else {
                format!("SAN {sans} covers every routed host")
            },
        ),
        (_, None) if !missing.is_empty() => Check::warn(
            "certificate.names",
            format!(
                "SAN {sans} does not cover {}",
                routes_of(&missing).join(", ")
            ),
            "set tunnel_domain and issue the certificate for *.<tunnel_domain>",
        )
        .fact("uncovered", missing),
        (_, None) => Check::ok(
            "certificate.names",
            format!("SAN {sans} covers every route key"),
        ),
    }
}

fn load_ca(config: &Config, now: i64, out: &mut Vec<Check>) -> Option<Ca> {
    let (path, whence) = ca_path(config)?;
    match std::fs::read(&path) {
        Ok(pem) => {
            let problems = preflight::ca_upload_problems(&pem, now);
            let fingerprint = crate::provision::fingerprint(&String::from_utf8_lossy(&pem));
            out.push(if problems.is_empty() {
                Check::ok(
                    "ca.upload_rules",
                    format!(
                        "{} ({whence}) meets the tunnel's CA rules (single PEM, CA:TRUE critical, keyCertSign, SKI, valid, key and signature strength)",
                        path.display()
                    ),
                )
            } else {
                Check::fail(
                    "ca.upload_rules",
                    format!(
                        "{} ({whence}) breaks the tunnel's CA rules: {}",
                        path.display(),
                        problems.join("; ")
                    ),
                    "create a CA that meets them (`mcp-tunnel certs init --tunnel-domain D --dir DIR` makes one), register it on the tunnel and issue the server certificate from it",
                )
            }
            .fact("fingerprint", fingerprint.clone().unwrap_or_default()));
            match certs::load_certs("certs.ca_cert_file", &path) {
                Ok(mut c) => Some(Ca {
                    path,
                    der: c.remove(0),
                    fingerprint,
                }),
                Err(_) => None,
            }
        }
        Err(e) => {
            out.push(Check::fail(
                "ca.upload_rules",
                format!(
                    "cannot read the CA certificate {} ({whence}): {e}",
                    path.display()
                ),
                "point [certs] ca_cert_file at the CA certificate registered on the tunnel",
            ));
            None
        }
    }
}

fn chain(config: &Config, leaf: &CertificateDer<'_>, ca: Option<&Ca>) -> Check {
    let Some(Ca { path, der: ca, .. }) = ca else {
        return Check::warn(
            "certificate.chain",
            "no CA certificate found ([certs] ca_cert_file, or ca.crt beside tls.cert_file): the chain cannot be checked and the MCP probe has nothing to trust",
            "set [certs] ca_cert_file to the CA certificate registered on the tunnel",
        );
    };
    match preflight::check_chain(leaf, ca) {
        Ok(()) => Check::ok(
            "certificate.chain",
            format!(
                "signed by {} (issuer, AKI = SKI, signature)",
                path.display()
            ),
        ),
        Err(e) => Check::fail(
            "certificate.chain",
            format!(
                "{e}: the edge refuses a certificate from a CA it does not know (`tls handshake failed ... unknown certificate authority`)"
            ),
            format!(
                "issue {} from the CA in {} ({}), or register the CA that did sign it on the tunnel and point [certs] ca_cert_file at it",
                config.tls.cert_file.display(),
                path.display(),
                renew_hint(config)
            ),
        ),
    }
}

/// With `[provision]`: whether the CA's fingerprint is among the tunnel's active
/// certificates (the Tunnels API; skipped `--offline`).
async fn registered(config: &Config, ca: Option<&Ca>, opts: &Options, env: &Env) -> Check {
    let name = "ca.registered";
    let Some(section) = &config.provision else {
        return Check::skip(
            name,
            "no [provision]: check in the Console (Manage > MCP tunnels > your tunnel > Certificates) that the CA's fingerprint is listed and active",
        );
    };
    if opts.offline {
        return Check::skip(name, "--offline: the Tunnels API was not asked");
    }
    let Some(Ca {
        path,
        fingerprint: Some(fp),
        ..
    }) = ca
    else {
        return Check::skip(name, "no CA certificate to look for");
    };
    let var = |k: &str| (env.var)(k);
    let mut settings = match crate::provision::Settings::resolve(
        &Default::default(),
        &var,
        Some(section),
    ) {
        Ok(s) => s,
        Err(e) => {
            return Check::warn(
                name,
                format!("cannot ask the Tunnels API: {e}"),
                "set the [provision] credentials (or their environment variables) as `run` uses them",
            );
        }
    };
    settings.retry = crate::provision::RetryPolicy {
        attempts: 1,
        base_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(1),
    };
    let tunnel = settings.tunnel_id.clone().or_else(|| {
        std::fs::read_to_string(section.state_file("tunnel-id"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    });
    let Some(tunnel) = tunnel else {
        return Check::warn(
            name,
            "no tunnel ID yet (not provisioned): the CA cannot be registered",
            "start the service (it provisions an empty state directory) or run `mcp-tunnel setup init`",
        );
    };
    let client = settings.client();
    match tokio::time::timeout(opts.timeout, client.active_certificates(&tunnel)).await {
        Ok(Ok(active)) if active.iter().any(|c| c.fingerprint.eq_ignore_ascii_case(fp)) => {
            Check::ok(
                name,
                format!(
                    "{} is registered and active on tunnel {tunnel} ({} active certificate{})",
                    path.display(),
                    active.len(),
                    if active.len() == 1 { "" } else { "s" }
                ),
            )
        }
        Ok(Ok(active)) => Check::fail(
            name,
            format!(
                "{} (SHA-256 {fp}) is not among the {} active certificate{} of tunnel {tunnel}: the edge refuses the server certificate (`unknown certificate authority`)",
                path.display(),
                active.len(),
                if active.len() == 1 { "" } else { "s" }
            ),
            "restart the service (it registers the state directory's CA) or run `mcp-tunnel setup init`; by hand: Console > your tunnel > Add certificate",
        )
        .fact("fingerprint", fp.as_str()),
        Ok(Err(e)) => Check::warn(
            name,
            format!("cannot ask the Tunnels API: {e}"),
            "check the [provision] credentials and the network path to the API",
        ),
        Err(_) => Check::warn(
            name,
            format!("the Tunnels API did not answer within {:?}", opts.timeout),
            "check the network path to the API",
        ),
    }
}

//! Programmatic provisioning (spec sections 9.5, 10, 11 and 15.2): the `setup init` and
//! `setup renew-cert` flows, and the run-time CA and token rotations built on them.
//!
//! API for `run`:
//! - [`provision_at_start`] (or [`StateDir::is_unprovisioned`] then [`ensure`]): provision
//!   at start, before the proxy loads `tls.crt`.
//! - [`ca_rotation_due`] then [`rotate_ca`] with the proxy's [`CertStore`] (or any
//!   [`InstallCert`]): a new CA in the second slot, a server certificate from it swapped in,
//!   then the old CA archived, with no window in which the presented certificate is untrusted.
//! - [`token_rotation_due`] then [`rotate_token`], followed by a cloudflared restart.

pub mod api;
pub mod state;
pub mod wif;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::certs::issue::{self, IssuedPair};
use crate::certs::{self, CertError};
use crate::config::ProvisionConfig;
use crate::config::provision::{DEFAULT_CA_RENEW_BEFORE, DEFAULT_CERT_DURATION, DEFAULT_STATE_DIR};
use crate::proxy::tls::CertStore;
pub use api::{ApiClient, RetryPolicy, TunnelCertificate};
pub use state::StateDir;
pub use wif::{Credentials, IdentitySource, WifSettings};

/// A credential held in memory: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The value, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// What the caller should do about an error (the supervisor matches on this, never on text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Fix the configuration or the federation rule; retrying unchanged will fail again.
    Config,
    /// The API refused for a reason that needs a person (cap reached, archived tunnel).
    Permanent,
    /// Network or server trouble: retry later.
    Transient,
}

/// Why provisioning failed; every message says what to check or do.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Config(String),
    #[error(
        "the identity token was rejected by federation rule {rule} (invalid_grant). Check, in this order: the token is not expired and its lifetime (exp - iat) is within the issuer's maximum (a literal ANTHROPIC_IDENTITY_TOKEN goes stale; prefer ANTHROPIC_IDENTITY_TOKEN_FILE); `iss` equals the rule's issuer and the issuer's JWKS is reachable and holds the token's `kid`; `aud` contains the rule's audience exactly (\"api.anthropic.com\" and \"https://api.anthropic.com\" differ); `sub` matches the rule's subject_prefix and the rule's claims/condition hold; the rule ID and organization ID are right and the rule is not archived. {facts}"
    )]
    InvalidGrant { rule: String, facts: String },
    #[error(
        "{what}: 401 Unauthorized: {}",
        if *api_token { "the Tunnels API key (API_TOKEN) is revoked, truncated, or from another organization" } else { "the access token from the federation exchange was not accepted; rerun, and check the organization ID" }
    )]
    Unauthorized { what: String, api_token: bool },
    #[error(
        "{what}: 403 Forbidden ({message}): {}",
        if *api_token { "the Tunnels API key is revoked or belongs to another organization" } else { "the federation rule's scopes must include workspace:manage_tunnels, and the rule's service account must be a member of the tunnel's workspace (set ANTHROPIC_WORKSPACE_ID to that workspace, or add the service account to it)" }
    )]
    Forbidden {
        what: String,
        message: String,
        api_token: bool,
    },
    #[error(
        "tunnel {tunnel_id} already has two active CA certificates ({}), the maximum: archive the one you no longer use (Console: the tunnel's certificates, or POST /v1/tunnels/{tunnel_id}/certificates/<id>/archive), then rerun",
        active.join("; ")
    )]
    CertificateCap {
        tunnel_id: String,
        active: Vec<String>,
    },
    #[error(
        "tunnel {0} is archived and can never carry traffic again: unset TUNNEL_ID / provision.tunnel_id (and remove tunnel-id from the output directory) to create a new tunnel, or give the ID of a live one"
    )]
    TunnelArchived(String),
    #[error(
        "tunnel {tunnel_id} already has an active CA certificate ({}) but {} holds no CA: another host (or an earlier run) provisioned this tunnel. Copy ca.crt, tls.crt, tls.key, tunnel-token, tunnel-id and tunnel-domain from the host that owns provisioning (docs/PACKAGING.md, Scaling out); or, if that CA's key is lost, run `mcp-tunnel setup init --new-ca` to register a second CA on purpose",
        active.join("; "),
        output.display()
    )]
    CaOwnedElsewhere {
        tunnel_id: String,
        active: Vec<String>,
        output: PathBuf,
    },
    #[error(
        "{what}: 404 not found ({message}): check the tunnel ID and that the credential's workspace is the tunnel's workspace"
    )]
    NotFound { what: String, message: String },
    #[error("{what}: HTTP {status} {kind}: {message}{}", request_id.as_ref().map(|r| format!(" (request_id {r})")).unwrap_or_default())]
    Api {
        what: String,
        status: u16,
        kind: String,
        message: String,
        request_id: Option<String>,
    },
    #[error(
        "cannot reach the Tunnels API ({url}) after {attempts} attempt(s) over {}s: {last}. Check egress to the API host on port 443 (firewall, HTTP proxy, DNS) and --api-url",
        elapsed.as_secs()
    )]
    Unreachable {
        url: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("unexpected answer from the Tunnels API: {0}")]
    Protocol(String),
    #[error(transparent)]
    Files(#[from] CertError),
    #[error(
        "the Tunnels API issued a new tunnel token for {tunnel_id}, but it could not be saved: {source}. The old token no longer opens new connections (connectors already connected stay up); once the file can be written, rotate again (`mcp-tunnel setup rotate --now --token`), which issues and saves another"
    )]
    TokenNotSaved {
        tunnel_id: String,
        source: CertError,
    },
}

/// A full disk: the next attempt succeeds once there is space again.
fn storage_full(e: &CertError) -> bool {
    matches!(e, CertError::Write { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
}

impl ProvisionError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ProvisionError::Unreachable { .. } => ErrorClass::Transient,
            ProvisionError::Files(e) | ProvisionError::TokenNotSaved { source: e, .. }
                if storage_full(e) =>
            {
                ErrorClass::Transient
            }
            ProvisionError::Api { status, .. } if *status >= 500 || *status == 429 => {
                ErrorClass::Transient
            }
            ProvisionError::Config(_)
            | ProvisionError::CaOwnedElsewhere { .. }
            | ProvisionError::InvalidGrant { .. }
            | ProvisionError::Unauthorized { .. }
            | ProvisionError::Forbidden { .. }
            | ProvisionError::NotFound { .. } => ErrorClass::Config,
            _ => ErrorClass::Permanent,
        }
    }
}

/// Maps a non-2xx Tunnels API answer to an actionable error.
fn api_error(
    method: &Method,
    path: &str,
    f: api::Failure,
    credentials: &Credentials,
) -> ProvisionError {
    let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
    let api_token = matches!(credentials, Credentials::ApiToken(_));
    match f.status {
        StatusCode::UNAUTHORIZED => ProvisionError::Unauthorized { what, api_token },
        StatusCode::FORBIDDEN => ProvisionError::Forbidden {
            what,
            message: f.message,
            api_token,
        },
        StatusCode::NOT_FOUND => ProvisionError::NotFound {
            what,
            message: f.message,
        },
        status => ProvisionError::Api {
            what,
            status: status.as_u16(),
            kind: f.kind,
            message: f.message,
            request_id: f.request_id,
        },
    }
}

/// Everything one provisioning run needs, resolved from flags, environment and config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api_url: String,
    pub tunnel_id: Option<String>,
    pub output: PathBuf,
    pub cert_duration: Duration,
    pub token_version: Option<String>,
    pub credentials: Credentials,
    pub workspace_id: Option<String>,
    pub ca_renew_before: Duration,
    pub rotate_token_every: Option<Duration>,
    pub retry: RetryPolicy,
    /// Extra trust anchors for the API's TLS (tests, private gateways); PEM DER list.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Register a new CA on a tunnel that already has an active one this state directory
    /// does not hold. Off (and never set by `run`): with several hosts, that CA belongs to
    /// the host that owns provisioning, and a second one must not appear by accident.
    pub new_ca: bool,
}

/// Command-line values; `None` falls back to the environment, then to `[provision]`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub api_url: Option<String>,
    pub tunnel_id: Option<String>,
    pub output: Option<String>,
    pub cert_duration: Option<Duration>,
    pub token_version: Option<String>,
    /// `setup init --new-ca`: see [`Settings::new_ca`].
    pub new_ca: bool,
}

impl Settings {
    /// Resolves settings: flag, then environment (`env` is injected so tests need not touch
    /// the process environment), then the config section. Names the flag/variable/field to
    /// set when something required is missing.
    pub fn resolve(
        flags: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
        config: Option<&ProvisionConfig>,
    ) -> Result<Settings, ProvisionError> {
        let cfg = |f: fn(&ProvisionConfig) -> Option<String>| config.and_then(f);
        let pick = |flag: &Option<String>, var: &str, c: Option<String>| {
            flag.clone()
                .or_else(|| env(var).filter(|v| !v.is_empty()))
                .or(c)
        };
        let api_url = pick(&flags.api_url, "API_URL", cfg(|c| c.api_url.clone()))
            .ok_or_else(|| {
                ProvisionError::Config(
                    "missing API URL: pass --api-url https://api.anthropic.com, set API_URL, or set provision.api_url".into(),
                )
            })?
            .trim_end_matches('/')
            .to_string();
        crate::config::provision::check_api_url(&api_url)
            .map_err(|m| ProvisionError::Config(format!("--api-url: {m}")))?;
        let tunnel_id = pick(&flags.tunnel_id, "TUNNEL_ID", cfg(|c| c.tunnel_id.clone()));
        if let Some(id) = &tunnel_id
            && let Some(m) = crate::config::provision::check_prefix(
                id,
                &["tnl_"],
                "tnl_01Hx9Kp2RtQvMn3sWbYdLcF8",
            )
        {
            return Err(ProvisionError::Config(format!(
                "TUNNEL_ID / --tunnel-id: {m}"
            )));
        }
        let output = match &flags.output {
            Some(o) => parse_output(o)?,
            None => {
                config.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |c| c.state_dir.clone())
            }
        };
        let workspace_id = env("ANTHROPIC_WORKSPACE_ID")
            .filter(|v| !v.is_empty())
            .or(cfg(|c| c.workspace_id.clone()));
        let credentials = resolve_credentials(env, config, workspace_id.clone())?;
        Ok(Settings {
            api_url,
            tunnel_id,
            output,
            cert_duration: flags
                .cert_duration
                .or(config.map(|c| c.cert_duration))
                .unwrap_or(DEFAULT_CERT_DURATION),
            token_version: flags
                .token_version
                .clone()
                .or(cfg(|c| c.token_version.clone())),
            credentials,
            workspace_id,
            ca_renew_before: config.map_or(DEFAULT_CA_RENEW_BEFORE, |c| c.ca_renew_before),
            rotate_token_every: config.and_then(|c| c.rotate_token_every),
            retry: RetryPolicy::default(),
            extra_roots: Vec::new(),
            new_ca: flags.new_ca,
        })
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(
            &self.api_url,
            self.credentials.clone(),
            self.workspace_id.clone().filter(|w| w != "default"),
            self.retry,
            &self.extra_roots,
        )
    }
}

/// `--output dir:PATH` (a bare path is accepted too); `k8s-secret:` belongs to the Helm chart.
pub fn parse_output(o: &str) -> Result<PathBuf, ProvisionError> {
    if let Some(p) = o.strip_prefix("dir:") {
        if p.is_empty() {
            return Err(ProvisionError::Config(
                "--output dir: needs a path, e.g. dir:/var/lib/mcp-tunnel".into(),
            ));
        }
        return Ok(PathBuf::from(p));
    }
    if o.starts_with("k8s-secret:") {
        return Err(ProvisionError::Config(format!(
            "--output {o}: Kubernetes Secrets are the Helm chart's output; this appliance writes a directory: use --output dir:{DEFAULT_STATE_DIR}"
        )));
    }
    if o.contains(':') && !o.starts_with('/') && !o.starts_with('.') {
        return Err(ProvisionError::Config(format!(
            "--output {o}: expected dir:/path"
        )));
    }
    Ok(PathBuf::from(o))
}

fn resolve_credentials(
    env: &dyn Fn(&str) -> Option<String>,
    config: Option<&ProvisionConfig>,
    workspace_id: Option<String>,
) -> Result<Credentials, ProvisionError> {
    // An environment variable set to the empty string still occupies its slot (spec 11).
    let file = env("ANTHROPIC_IDENTITY_TOKEN_FILE");
    let literal = env("ANTHROPIC_IDENTITY_TOKEN");
    let api_token = env("API_TOKEN");
    let identity = match (file, literal) {
        (Some(_), Some(_)) => {
            return Err(ProvisionError::Config(
                "both ANTHROPIC_IDENTITY_TOKEN_FILE and ANTHROPIC_IDENTITY_TOKEN are set (an empty value still counts): unset one".into(),
            ));
        }
        (Some(f), None) if f.is_empty() => {
            return Err(ProvisionError::Config("ANTHROPIC_IDENTITY_TOKEN_FILE is set but empty: give the path of the OIDC token, or unset it".into()));
        }
        (None, Some(t)) if t.is_empty() => {
            return Err(ProvisionError::Config(
                "ANTHROPIC_IDENTITY_TOKEN is set but empty: give the OIDC JWT, or unset it".into(),
            ));
        }
        (Some(f), None) => Some(IdentitySource::File(PathBuf::from(f))),
        (None, Some(t)) => Some(IdentitySource::Literal(Secret::new(t.trim()))),
        (None, None) => None,
    };
    if let Some(t) = api_token {
        if identity.is_some() {
            return Err(ProvisionError::Config(
                "API_TOKEN and an ANTHROPIC_IDENTITY_TOKEN* variable are both set: use one credential (API_TOKEN for a Tunnels API key, the ANTHROPIC_* variables for Workload Identity Federation)".into(),
            ));
        }
        if t.trim().is_empty() {
            return Err(ProvisionError::Config("API_TOKEN is set but empty".into()));
        }
        return Ok(Credentials::ApiToken(Secret::new(t.trim())));
    }
    let identity = match identity {
        Some(i) => i,
        None => match config {
            Some(c) if c.api_token_file.is_some() => {
                let path = c.api_token_file.as_ref().expect("checked");
                let t = std::fs::read_to_string(path).map_err(|e| {
                    ProvisionError::Config(format!(
                        "provision.api_token_file ({}): cannot read: {e}",
                        path.display()
                    ))
                })?;
                return Ok(Credentials::ApiToken(Secret::new(t.trim())));
            }
            Some(c) if c.identity_token_file.is_some() => {
                IdentitySource::File(c.identity_token_file.clone().expect("checked"))
            }
            _ => {
                return Err(ProvisionError::Config(
                    "no credential: set ANTHROPIC_IDENTITY_TOKEN_FILE (or ANTHROPIC_IDENTITY_TOKEN) with ANTHROPIC_FEDERATION_RULE_ID and ANTHROPIC_ORGANIZATION_ID for Workload Identity Federation, or API_TOKEN for a Tunnels API key (or provision.identity_token_file / provision.api_token_file)".into(),
                ));
            }
        },
    };
    let get = |var: &str, field: fn(&ProvisionConfig) -> Option<String>| {
        env(var)
            .filter(|v| !v.is_empty())
            .or_else(|| config.and_then(field))
    };
    let federation_rule_id = get("ANTHROPIC_FEDERATION_RULE_ID", |c| c.federation_rule_id.clone())
        .ok_or_else(|| ProvisionError::Config("missing ANTHROPIC_FEDERATION_RULE_ID (fdrl_...): the federation rule that trusts this host's identity token".into()))?;
    let organization_id = get("ANTHROPIC_ORGANIZATION_ID", |c| c.organization_id.clone())
        .ok_or_else(|| {
            ProvisionError::Config(
                "missing ANTHROPIC_ORGANIZATION_ID (the organization UUID)".into(),
            )
        })?;
    Ok(Credentials::Wif(WifSettings {
        federation_rule_id,
        organization_id,
        service_account_id: get("ANTHROPIC_SERVICE_ACCOUNT_ID", |c| {
            c.service_account_id.clone()
        }),
        workspace_id,
        identity,
    }))
}

/// What a provisioning run did (no secrets: safe to print and log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub tunnel_id: String,
    pub domain: String,
    pub created_tunnel: bool,
    /// The certificate record ID when a CA was registered by this run.
    pub registered_ca: Option<String>,
    pub new_ca: bool,
    pub issued_server_cert: bool,
    pub rotated_token: bool,
    /// State files whose content changed.
    pub changed: Vec<&'static str>,
}

/// Server certificates with less than this left are reissued by `init`.
const SERVER_MIN_REMAINING: Duration = Duration::from_secs(30 * 86400);

/// `setup init` (spec 15.2): idempotent over the output directory. Reuses the stored tunnel
/// and CA, creates a tunnel only when none is known, registers a CA only when it is new (or a
/// stored one turns out unregistered, e.g. after a crash), rotates the token only when the
/// token version changed, and rewrites only files whose content changes.
pub async fn ensure(settings: &Settings) -> Result<Outcome, ProvisionError> {
    let dir = StateDir::create(&settings.output)?;
    let client = settings.client();
    let mut changed = Vec::new();
    let stored_id = dir.read(state::TUNNEL_ID);

    let (tunnel, created_tunnel) = match settings.tunnel_id.clone().or(stored_id.clone()) {
        Some(id) => {
            let t = client.get_tunnel(&id).await?;
            if t.archived_at.is_some() {
                return Err(ProvisionError::TunnelArchived(t.id));
            }
            (t, false)
        }
        None => {
            let t = client.create_tunnel().await?;
            info!(tunnel_id = %t.id, domain = %t.domain, "created tunnel");
            (t, true)
        }
    };
    let tunnel_changed = stored_id.as_deref() != Some(tunnel.id.as_str());
    // Record the tunnel at once: a crash after this point must not create a second one.
    if dir.write(state::TUNNEL_ID, &tunnel.id)? {
        changed.push(state::TUNNEL_ID);
    }
    if dir.write(state::TUNNEL_DOMAIN, &tunnel.domain)? {
        changed.push(state::TUNNEL_DOMAIN);
    }

    let stored_ca = if tunnel_changed && stored_id.is_some() {
        None
    } else {
        read_pair(&dir, state::CA_CRT, state::CA_KEY)
    };
    let new_ca = stored_ca.is_none();
    if new_ca && !created_tunnel && !settings.new_ca {
        let active = client.active_certificates(&tunnel.id).await?;
        if !active.is_empty() {
            return Err(ProvisionError::CaOwnedElsewhere {
                tunnel_id: tunnel.id.clone(),
                active: active.iter().map(describe_cert).collect(),
                output: settings.output.clone(),
            });
        }
    }
    let ca = match stored_ca {
        Some(ca) => ca,
        None => {
            let ca = issue::generate_ca(issue::CA_VALIDITY)?;
            // Key first: a CA certificate on disk always has its key beside it.
            dir.write_together(&[(state::CA_KEY, &ca.key_pem), (state::CA_CRT, &ca.cert_pem)])?;
            changed.extend([state::CA_KEY, state::CA_CRT]);
            info!(tunnel_id = %tunnel.id, "generated a new CA (ECDSA P-256, 5 years)");
            ca
        }
    };
    let registered_ca = ensure_registered(&client, &tunnel.id, &ca.cert_pem).await?;

    let now = OffsetDateTime::now_utc();
    let issued_server_cert = new_ca
        || !server_cert_usable(
            &dir,
            &ca.cert_pem,
            &tunnel.domain,
            now,
            SERVER_MIN_REMAINING,
        );
    if issued_server_cert {
        let server = issue::issue_server(&ca, &tunnel.domain, settings.cert_duration)?;
        write_server(&dir, &server)?;
        changed.extend([state::TLS_KEY, state::TLS_CRT]);
        info!(domain = %tunnel.domain, validity = ?settings.cert_duration, "issued server certificate");
    }

    let stored_version = if tunnel_changed {
        None
    } else {
        dir.read(state::TOKEN_VERSION)
    };
    let rotate = matches!((&settings.token_version, &stored_version), (Some(v), Some(s)) if v != s);
    let token = if rotate {
        let reason = format!(
            "mcp-tunnel setup: token version {} -> {}",
            stored_version.as_deref().unwrap_or(""),
            settings.token_version.as_deref().unwrap_or("")
        );
        let t = client.rotate_token(&tunnel.id, &reason).await?;
        info!(tunnel_id = %tunnel.id, token_id = %t.id, "rotated tunnel token");
        t
    } else {
        client.reveal_token(&tunnel.id).await?
    };
    if dir.write(state::TUNNEL_TOKEN, token.tunnel_token.expose())? {
        changed.push(state::TUNNEL_TOKEN);
    }
    if let Some(v) = &settings.token_version
        && dir.write(state::TOKEN_VERSION, v)?
    {
        changed.push(state::TOKEN_VERSION);
    }
    changed.dedup();
    Ok(Outcome {
        tunnel_id: tunnel.id,
        domain: tunnel.domain,
        created_tunnel,
        registered_ca,
        new_ca,
        issued_server_cert,
        rotated_token: rotate,
        changed,
    })
}

fn read_pair(dir: &StateDir, crt: &str, key: &str) -> Option<IssuedPair> {
    let pair = IssuedPair {
        cert_pem: dir.read(crt)?,
        key_pem: dir.read(key)?,
    };
    // Only a pair that can still sign counts as stored; anything else is regenerated.
    rcgen::KeyPair::from_pem(&pair.key_pem).ok()?;
    issue::not_after_pem(&pair.cert_pem)?;
    Some(pair)
}

fn write_server(dir: &StateDir, server: &IssuedPair) -> Result<(), CertError> {
    // Key before certificate: a watcher that reloads on the certificate sees a matching key.
    dir.write_together(&[
        (state::TLS_KEY, &server.key_pem),
        (state::TLS_CRT, &server.cert_pem),
    ])?;
    Ok(())
}

/// Lowercase hex SHA-256 of the first certificate's DER: the API's `fingerprint`.
pub fn fingerprint(cert_pem: &str) -> Option<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    Some(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Registers `ca_pem` on the tunnel unless an active record already has its fingerprint.
/// Returns the new record's ID when it registered. The cap is checked first so that the
/// operator gets the list of active certificates, whatever the API's error text.
async fn ensure_registered(
    client: &ApiClient,
    tunnel_id: &str,
    ca_pem: &str,
) -> Result<Option<String>, ProvisionError> {
    let fp = fingerprint(ca_pem)
        .ok_or_else(|| ProvisionError::Protocol("the stored CA certificate is not PEM".into()))?;
    let active = client.active_certificates(tunnel_id).await?;
    if active
        .iter()
        .any(|c| c.fingerprint.eq_ignore_ascii_case(&fp))
    {
        return Ok(None);
    }
    let cap = |active: &[TunnelCertificate]| ProvisionError::CertificateCap {
        tunnel_id: tunnel_id.to_string(),
        active: active.iter().map(describe_cert).collect(),
    };
    if active.len() >= 2 {
        return Err(cap(&active));
    }
    match client.register_certificate(tunnel_id, ca_pem).await {
        Ok(rec) => {
            info!(tunnel_id, certificate_id = %rec.id, fingerprint = %fp, "registered CA certificate");
            Ok(Some(rec.id))
        }
        Err(
            e @ ProvisionError::Api {
                status: 400..=499, ..
            },
        ) => {
            // Another writer may have filled the second slot since the listing.
            match client.active_certificates(tunnel_id).await {
                Ok(now) if now.len() >= 2 => Err(cap(&now)),
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn describe_cert(c: &TunnelCertificate) -> String {
    format!(
        "{} created {} expires {}",
        c.id,
        c.created_at.as_deref().unwrap_or("?"),
        c.expires_at.as_deref().unwrap_or("?")
    )
}

/// Whether the stored server pair can be kept: it parses, its key matches, it was issued by
/// `ca_pem` (AKI = CA SKI), its SAN covers `*.<domain>`, and more than `min_remaining` is left.
fn server_cert_usable(
    dir: &StateDir,
    ca_pem: &str,
    domain: &str,
    now: OffsetDateTime,
    min_remaining: Duration,
) -> bool {
    let (Some(cert_pem), Some(key_pem)) = (dir.read(state::TLS_CRT), dir.read(state::TLS_KEY))
    else {
        return false;
    };
    let pair = IssuedPair { cert_pem, key_pem };
    if issue::certified_key(&pair).is_err() {
        return false;
    }
    leaf_fits(&pair.cert_pem, ca_pem, domain, now, min_remaining)
}

fn leaf_fits(
    leaf_pem: &str,
    ca_pem: &str,
    domain: &str,
    now: OffsetDateTime,
    min_remaining: Duration,
) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (Ok(leaf_der), Ok(ca_der)) = (
        CertificateDer::from_pem_slice(leaf_pem.as_bytes()),
        CertificateDer::from_pem_slice(ca_pem.as_bytes()),
    ) else {
        return false;
    };
    let (Ok((_, leaf)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(&leaf_der),
        x509_parser::parse_x509_certificate(&ca_der),
    ) else {
        return false;
    };
    let mut ski = None;
    for ext in ca.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(k) = ext.parsed_extension() {
            ski = Some(k.0.to_vec());
        }
    }
    let mut aki = None;
    let mut covers = false;
    let wildcard = format!("*.{domain}");
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                covers = san.general_names.iter().any(
                    |n| matches!(n, GeneralName::DNSName(d) if d.eq_ignore_ascii_case(&wildcard)),
                )
            }
            _ => {}
        }
    }
    let not_after = leaf.validity().not_after.to_datetime();
    ski.is_some()
        && aki == ski
        && leaf.issuer() == ca.subject()
        && leaf.verify_signature(Some(ca.public_key())).is_ok()
        && covers
        && not_after - now > min_remaining
}

/// `setup renew-cert` (spec 9.5): a new server certificate from the stored CA when the current
/// one has `renew_before` or less left (`0` = always); no API call. Returns whether it renewed.
pub fn renew_cert(
    output: &Path,
    cert_duration: Duration,
    renew_before: Duration,
) -> Result<bool, ProvisionError> {
    let dir = StateDir::open(output);
    let ca = read_pair(&dir, state::CA_CRT, state::CA_KEY).ok_or_else(|| {
        ProvisionError::Config(format!(
            "{}: no usable ca.crt/ca.key: run `mcp-tunnel setup init` first",
            output.display()
        ))
    })?;
    let domain = dir.read(state::TUNNEL_DOMAIN).ok_or_else(|| {
        ProvisionError::Config(format!(
            "{}: no tunnel-domain: run `mcp-tunnel setup init` first",
            output.display()
        ))
    })?;
    if !renew_before.is_zero()
        && server_cert_usable(
            &dir,
            &ca.cert_pem,
            &domain,
            OffsetDateTime::now_utc(),
            renew_before,
        )
    {
        return Ok(false);
    }
    let server = issue::issue_server(&ca, &domain, cert_duration)?;
    write_server(&dir, &server)?;
    Ok(true)
}

/// Whether the CA must be rotated now: less than `renew_before` left (pure).
pub fn ca_rotation_due(
    ca_not_after: OffsetDateTime,
    now: OffsetDateTime,
    renew_before: Duration,
) -> bool {
    ca_not_after - now <= renew_before
}

/// The stored CA's expiry, for [`ca_rotation_due`].
pub fn stored_ca_not_after(output: &Path) -> Option<OffsetDateTime> {
    issue::not_after_pem(&StateDir::open(output).read(state::CA_CRT)?)
}

/// Whether the tunnel token is due for its scheduled rotation (pure): `every` has passed
/// since `last` (the tunnel-token file's mtime: it changes only when the token does).
pub fn token_rotation_due(last: SystemTime, now: SystemTime, every: Duration) -> bool {
    now.duration_since(last).is_ok_and(|age| age >= every)
}

/// When the stored tunnel token last changed.
pub fn token_changed_at(output: &Path) -> Option<SystemTime> {
    std::fs::metadata(StateDir::open(output).file(state::TUNNEL_TOKEN))
        .and_then(|m| m.modified())
        .ok()
}

/// Something that starts presenting a new server certificate for new handshakes.
pub trait InstallCert: Sync {
    fn install(&self, key: Arc<CertifiedKey>);
}

impl InstallCert for CertStore {
    fn install(&self, key: Arc<CertifiedKey>) {
        self.swap(key);
    }
}

impl InstallCert for crate::proxy::Proxy {
    fn install(&self, key: Arc<CertifiedKey>) {
        self.install_cert(key);
    }
}

impl<F: Fn(Arc<CertifiedKey>) + Sync> InstallCert for F {
    fn install(&self, key: Arc<CertifiedKey>) {
        self(key)
    }
}

/// What a CA rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRotation {
    pub registered: Option<String>,
    pub archived: Option<String>,
}

/// Rotates the tunnel CA with no failed handshake:
/// 1. generate the new CA (or resume one left by a crash) and keep it as `ca-next.*`;
/// 2. register it in the second slot; wait `settle` so the new trust set has propagated;
/// 3. issue a server certificate from it, write `tls.*`, install it in the proxy;
/// 4. promote it to `ca.*`; wait `settle` so handshakes that began with the old certificate
///    finish; archive the old CA's record.
///
/// Between 2 and 4 both CAs are trusted, so whichever certificate a handshake gets verifies.
pub async fn rotate_ca(
    settings: &Settings,
    installer: &dyn InstallCert,
    settle: Duration,
) -> Result<CaRotation, ProvisionError> {
    let dir = StateDir::open(&settings.output);
    let client = settings.client();
    let tunnel_id = dir.read(state::TUNNEL_ID).ok_or_else(|| {
        ProvisionError::Config(format!(
            "{}: no tunnel-id: provision first",
            dir.path().display()
        ))
    })?;
    let domain = dir.read(state::TUNNEL_DOMAIN).ok_or_else(|| {
        ProvisionError::Config(format!(
            "{}: no tunnel-domain: provision first",
            dir.path().display()
        ))
    })?;
    let old = read_pair(&dir, state::CA_CRT, state::CA_KEY);
    let next = match read_pair(&dir, state::CA_NEXT_CRT, state::CA_NEXT_KEY) {
        Some(n) => n,
        None => {
            let n = issue::generate_ca(issue::CA_VALIDITY)?;
            dir.write_together(&[
                (state::CA_NEXT_KEY, &n.key_pem),
                (state::CA_NEXT_CRT, &n.cert_pem),
            ])?;
            n
        }
    };
    let registered = ensure_registered(&client, &tunnel_id, &next.cert_pem).await?;
    info!(tunnel_id = %tunnel_id, "CA rotation: new CA registered beside the old one");
    tokio::time::sleep(settle).await;

    let server = issue::issue_server(&next, &domain, settings.cert_duration)?;
    let key = issue::certified_key(&server)?;
    write_server(&dir, &server)?;
    installer.install(key);
    info!(tunnel_id = %tunnel_id, "CA rotation: server certificate from the new CA installed");

    // On a resume after the promotion, `ca.crt` already is the new CA: keep the recorded
    // previous one (overwriting it with the new CA would archive the CA in use).
    if let Some(old) = old.as_ref().filter(|o| o.cert_pem != next.cert_pem) {
        dir.write(state::CA_PREVIOUS_CRT, &old.cert_pem)?;
    }
    dir.write_together(&[
        (state::CA_KEY, &next.key_pem),
        (state::CA_CRT, &next.cert_pem),
    ])?;
    dir.remove(state::CA_NEXT_KEY)?;
    dir.remove(state::CA_NEXT_CRT)?;
    tokio::time::sleep(settle).await;

    let archived = archive_previous_ca(settings).await?;
    Ok(CaRotation {
        registered,
        archived,
    })
}

/// The last step of [`rotate_ca`], alone: archives the record of `ca-previous.crt` (the CA
/// rotated out) and forgets it. For `run` to finish a rotation interrupted after the swap.
pub async fn archive_previous_ca(settings: &Settings) -> Result<Option<String>, ProvisionError> {
    let dir = StateDir::open(&settings.output);
    let Some(prev) = dir.read(state::CA_PREVIOUS_CRT) else {
        return Ok(None);
    };
    let tunnel_id = dir.read(state::TUNNEL_ID).ok_or_else(|| {
        ProvisionError::Config(format!(
            "{}: no tunnel-id: provision first",
            dir.path().display()
        ))
    })?;
    let client = settings.client();
    let fp = fingerprint(&prev).unwrap_or_default();
    let active = client.active_certificates(&tunnel_id).await?;
    let mut archived = None;
    if let Some(rec) = active
        .iter()
        .find(|c| c.fingerprint.eq_ignore_ascii_case(&fp))
    {
        client.archive_certificate(&tunnel_id, &rec.id).await?;
        info!(tunnel_id = %tunnel_id, certificate_id = %rec.id, "CA rotation: old CA archived");
        archived = Some(rec.id.clone());
    } else {
        warn!(tunnel_id = %tunnel_id, "CA rotation: the old CA had no active record to archive");
    }
    dir.remove(state::CA_PREVIOUS_CRT)?;
    Ok(archived)
}

/// What [`rotate_ca`] left unfinished in `output` (after a crash or a shutdown mid-way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRotation {
    None,
    /// `ca-next.*` exists: resume with [`rotate_ca`] (it reuses that key).
    Rotate,
    /// Only `ca-previous.crt` is left: [`archive_previous_ca`].
    Archive,
}

pub fn pending_rotation(output: &Path) -> PendingRotation {
    let dir = StateDir::open(output);
    if dir.read(state::CA_NEXT_CRT).is_some() && dir.read(state::CA_NEXT_KEY).is_some() {
        PendingRotation::Rotate
    } else if dir.read(state::CA_PREVIOUS_CRT).is_some() {
        PendingRotation::Archive
    } else {
        PendingRotation::None
    }
}

/// Rotates the tunnel token and stores the new one; the caller restarts cloudflared so it
/// connects with it (established connections are not severed by the API). Returns the new
/// token's (non-secret) ID.
pub async fn rotate_token(settings: &Settings, reason: &str) -> Result<String, ProvisionError> {
    let dir = StateDir::open(&settings.output);
    let tunnel_id = dir.read(state::TUNNEL_ID).ok_or_else(|| {
        ProvisionError::Config(format!(
            "{}: no tunnel-id: provision first",
            dir.path().display()
        ))
    })?;
    let token = settings.client().rotate_token(&tunnel_id, reason).await?;
    dir.write(state::TUNNEL_TOKEN, token.tunnel_token.expose())
        .map_err(|source| ProvisionError::TokenNotSaved {
            tunnel_id: tunnel_id.clone(),
            source,
        })?;
    info!(tunnel_id = %tunnel_id, token_id = %token.id, "rotated tunnel token");
    Ok(token.id)
}

/// For `run`, before the proxy loads its certificate: when `[provision]` is configured and
/// its state directory holds no tunnel yet, provision (as `setup init`, with the process
/// environment over the section). `None` when there was nothing to do.
pub async fn provision_at_start(
    config: &crate::config::Config,
) -> Result<Option<Outcome>, ProvisionError> {
    let Some(section) = &config.provision else {
        return Ok(None);
    };
    if !StateDir::open(&section.state_dir).is_unprovisioned() {
        return Ok(None);
    }
    let env = |k: &str| std::env::var(k).ok();
    let settings = Settings::resolve(&Overrides::default(), &env, Some(section))?;
    let outcome = ensure(&settings).await?;
    info!(tunnel_id = %outcome.tunnel_id, domain = %outcome.domain, "provisioned at start");
    Ok(Some(outcome))
}

/// Loads the stored server pair as the proxy would (for tests and `run`).
pub fn load_server(output: &Path) -> Result<Arc<CertifiedKey>, CertError> {
    let dir = StateDir::open(output);
    certs::load_server_pair(&crate::config::TlsFiles {
        cert_file: dir.file(state::TLS_CRT),
        key_file: dir.file(state::TLS_KEY),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_schedules() {
        let now = OffsetDateTime::now_utc();
        let day = Duration::from_secs(86400);
        assert!(ca_rotation_due(
            now + time::Duration::days(100),
            now,
            180 * day
        ));
        assert!(!ca_rotation_due(
            now + time::Duration::days(200),
            now,
            180 * day
        ));
        assert!(ca_rotation_due(
            now - time::Duration::days(1),
            now,
            180 * day
        ));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!token_rotation_due(t0, t0 + 29 * day, 30 * day));
        assert!(token_rotation_due(t0, t0 + 30 * day, 30 * day));
        assert!(!token_rotation_due(t0 + day, t0, 30 * day));
    }

    #[test]
    fn output_forms() {
        assert_eq!(parse_output("dir:/data").unwrap(), PathBuf::from("/data"));
        assert_eq!(parse_output("/data").unwrap(), PathBuf::from("/data"));
        assert!(
            parse_output("k8s-secret:mcp-tunnel")
                .unwrap_err()
                .to_string()
                .contains("Helm")
        );
        assert!(parse_output("dir:").is_err());
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("sk-ant-oat01-xyz");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
    }

    #[test]
    fn credential_resolution() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let flags = Overrides {
            api_url: Some("https://api.anthropic.com".into()),
            ..Default::default()
        };
        let both = env(&[
            ("ANTHROPIC_IDENTITY_TOKEN_FILE", "/t"),
            ("ANTHROPIC_IDENTITY_TOKEN", ""),
        ]);
        let err = Settings::resolve(&flags, &both, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("both"), "{err}");
        let wif = env(&[
            ("ANTHROPIC_IDENTITY_TOKEN_FILE", "/t"),
            ("ANTHROPIC_FEDERATION_RULE_ID", "fdrl_1"),
            ("ANTHROPIC_ORGANIZATION_ID", "org"),
            ("TUNNEL_ID", "tnl_9"),
        ]);
        let s = Settings::resolve(&flags, &wif, None).unwrap();
        assert_eq!(s.tunnel_id.as_deref(), Some("tnl_9"));
        assert!(
            matches!(s.credentials, Credentials::Wif(ref w) if w.federation_rule_id == "fdrl_1")
        );
        let missing = env(&[("ANTHROPIC_IDENTITY_TOKEN", "x.y.z")]);
        let err = Settings::resolve(&flags, &missing, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ANTHROPIC_FEDERATION_RULE_ID"), "{err}");
        let api = env(&[("API_TOKEN", "k")]);
        assert!(matches!(
            Settings::resolve(&flags, &api, None).unwrap().credentials,
            Credentials::ApiToken(_)
        ));
        let no_url = Settings::resolve(&Overrides::default(), &api, None)
            .unwrap_err()
            .to_string();
        assert!(no_url.contains("--api-url"), "{no_url}");
    }
}

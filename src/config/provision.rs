//! The `[provision]` section: how the appliance provisions itself through the Tunnels API
//! (the reference `setup init` settings, plus the run-time rotation schedule).
//!
//! Secrets never live in the config file: the identity token and the API token are named by
//! a file path (`identity_token_file`, `api_token_file`), so the file can stay world-readable
//! and the secret keeps its own owner-only mode. The literal forms exist only as environment
//! variables, as in the reference.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// Where provisioning writes its state when neither `--output` nor `state_dir` says otherwise
/// (systemd `StateDirectory=mcp-tunnel`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mcp-tunnel";
/// The reference `--cert-duration` default (90 days).
pub const DEFAULT_CERT_DURATION: Duration = Duration::from_secs(2160 * 3600);
/// Rotate the CA this long before it expires: far more than a server certificate's lifetime,
/// so that no server certificate ever outlives its CA.
pub const DEFAULT_CA_RENEW_BEFORE: Duration = Duration::from_secs(180 * 86400);

/// A validated `[provision]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionConfig {
    pub api_url: Option<String>,
    pub tunnel_id: Option<String>,
    pub state_dir: PathBuf,
    pub cert_duration: Duration,
    pub token_version: Option<String>,
    pub federation_rule_id: Option<String>,
    pub organization_id: Option<String>,
    pub workspace_id: Option<String>,
    pub service_account_id: Option<String>,
    pub identity_token_file: Option<PathBuf>,
    pub api_token_file: Option<PathBuf>,
    pub ca_renew_before: Duration,
    pub rotate_token_every: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvision {
    api_url: Option<String>,
    tunnel_id: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    cert_duration: Option<Duration>,
    token_version: Option<String>,
    federation_rule_id: Option<String>,
    organization_id: Option<String>,
    workspace_id: Option<String>,
    service_account_id: Option<String>,
    identity_token_file: Option<PathBuf>,
    api_token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    ca_renew_before: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    rotate_token_every: Option<Duration>,
}

/// Checks an ID's documented prefix (`tnl_`, `fdrl_`, ...); `None` when it is acceptable.
pub fn check_prefix(value: &str, prefixes: &[&str], example: &str) -> Option<String> {
    // An empty prefix accepts any non-empty value (the organization ID is a bare UUID).
    let ok = prefixes
        .iter()
        .any(|p| value.len() > p.len() && value.starts_with(p))
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    (!ok).then(|| format!("expected an ID such as {example:?}, found {value:?}"))
}

/// Checks an API base URL: `https://host[:port]`, or `http://` for a loopback host only
/// (a bearer token must not cross a network in clear text).
pub fn check_api_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("expected a URL such as \"https://api.anthropic.com\": {e}"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") if is_loopback_host(host) => Ok(()),
        Some("http") => Err(format!(
            "expected an https:// URL: {url:?} would send the API token in clear text (http:// is accepted for loopback test servers only)"
        )),
        _ => Err(format!(
            "expected a URL such as \"https://api.anthropic.com\", found {url:?}"
        )),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl RawProvision {
    /// Validates the section; `push(field, message)` collects problems with dotted field names.
    pub(super) fn validate(
        self,
        base: &Path,
        push: &mut dyn FnMut(&str, String),
    ) -> ProvisionConfig {
        let nonempty = |v: Option<String>| v.map(|s| s.trim().to_string());
        let api_url = nonempty(self.api_url).map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &api_url
            && let Err(m) = check_api_url(u)
        {
            push("provision.api_url", m);
        }
        let ids: [(&str, &Option<String>, &[&str], &str); 4] = [
            (
                "provision.tunnel_id",
                &self.tunnel_id,
                &["tnl_"],
                "tnl_01Hx9Kp2RtQvMn3sWbYdLcF8",
            ),
            (
                "provision.federation_rule_id",
                &self.federation_rule_id,
                &["fdrl_"],
                "fdrl_...",
            ),
            (
                "provision.service_account_id",
                &self.service_account_id,
                &["svac_"],
                "svac_...",
            ),
            (
                "provision.organization_id",
                &self.organization_id,
                &[""],
                "00000000-0000-0000-0000-000000000000",
            ),
        ];
        for (field, value, prefixes, example) in ids {
            if let Some(v) = value
                && let Some(m) = check_prefix(v, prefixes, example)
            {
                push(field, m);
            }
        }
        if let Some(w) = &self.workspace_id
            && w != "default"
            && let Some(m) = check_prefix(w, &["wrkspc_"], "wrkspc_... or \"default\"")
        {
            push("provision.workspace_id", m);
        }
        if self.identity_token_file.is_some() && self.api_token_file.is_some() {
            push(
                "provision.api_token_file",
                "identity_token_file (Workload Identity Federation) and api_token_file (a Tunnels API key) are mutually exclusive: keep one".into(),
            );
        }
        if self.identity_token_file.is_some() {
            if self.federation_rule_id.is_none() {
                push(
                    "provision.federation_rule_id",
                    "missing: identity_token_file needs the federation rule (\"fdrl_...\")".into(),
                );
            }
            if self.organization_id.is_none() {
                push(
                    "provision.organization_id",
                    "missing: identity_token_file needs the organization ID (a UUID)".into(),
                );
            }
        }
        let cert_duration = self.cert_duration.unwrap_or(DEFAULT_CERT_DURATION);
        if cert_duration < Duration::from_secs(3600) {
            push(
                "provision.cert_duration",
                "expected at least \"1h\" (the reference default is \"2160h\")".into(),
            );
        }
        if let Some(every) = self.rotate_token_every
            && every < Duration::from_secs(3600)
        {
            push(
                "provision.rotate_token_every",
                "expected at least \"1h\": each rotation restarts cloudflared".into(),
            );
        }
        if let Some(v) = &self.token_version
            && v.trim().is_empty()
        {
            push(
                "provision.token_version",
                "expected a non-empty string such as \"1\"".into(),
            );
        }
        ProvisionConfig {
            api_url,
            tunnel_id: nonempty(self.tunnel_id),
            state_dir: self
                .state_dir
                .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| base.join(p)),
            cert_duration,
            token_version: nonempty(self.token_version),
            federation_rule_id: nonempty(self.federation_rule_id),
            organization_id: nonempty(self.organization_id),
            workspace_id: nonempty(self.workspace_id),
            service_account_id: nonempty(self.service_account_id),
            identity_token_file: self.identity_token_file.map(|p| base.join(p)),
            api_token_file: self.api_token_file.map(|p| base.join(p)),
            ca_renew_before: self.ca_renew_before.unwrap_or(DEFAULT_CA_RENEW_BEFORE),
            rotate_token_every: self.rotate_token_every,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> (ProvisionConfig, Vec<(String, String)>) {
        let raw: RawProvision = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let cfg = raw.validate(Path::new("/etc/mcp-tunnel"), &mut |f, m| {
            problems.push((f.to_string(), m))
        });
        (cfg, problems)
    }

    #[test]
    fn defaults_and_relative_paths() {
        let (cfg, problems) = validate(
            "api_url = \"https://api.anthropic.com/\"\nfederation_rule_id = \"fdrl_1\"\norganization_id = \"org\"\nidentity_token_file = \"token.jwt\"\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cfg.api_url.as_deref(), Some("https://api.anthropic.com"));
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(cfg.cert_duration, DEFAULT_CERT_DURATION);
        assert_eq!(
            cfg.identity_token_file,
            Some(PathBuf::from("/etc/mcp-tunnel/token.jwt"))
        );
    }

    #[test]
    fn names_each_bad_field() {
        let (_, problems) = validate(
            "api_url = \"http://api.example.com\"\ntunnel_id = \"abc\"\nidentity_token_file = \"a\"\napi_token_file = \"b\"\n",
        );
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "provision.api_url",
                "provision.tunnel_id",
                "provision.api_token_file",
                "provision.federation_rule_id",
                "provision.organization_id"
            ]
        );
        assert!(problems[0].1.contains("clear text"));
    }

    #[test]
    fn loopback_http_is_allowed_for_test_servers() {
        assert!(check_api_url("http://127.0.0.1:9999").is_ok());
        assert!(check_api_url("http://localhost:9999").is_ok());
        assert!(check_api_url("http://[::1]:9999").is_ok());
        assert!(check_api_url("http://10.0.0.1").is_err());
        assert!(check_api_url("ftp://x").is_err());
    }
}

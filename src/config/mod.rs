//! Configuration: the TOML schema, its defaults, and validation that names file, field and
//! expectation. Field names follow the reference stack so operators recognise them.

pub mod admin;
pub mod certs;
pub mod change;
pub mod cloudflared;
pub mod duration;
pub mod ipset;
pub mod limits;
pub mod mcp;
pub mod peer_check;
pub mod provision;
pub mod routes;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use admin::AdminConfig;
pub use certs::CertsConfig;
pub use cloudflared::{CloudflaredConfig, Replacement};
pub use ipset::IpPolicy;
pub use limits::Limits;
pub use mcp::McpConfig;
pub use peer_check::{PeerCheck, PeerCheckOff};
pub use provision::ProvisionConfig;
pub use routes::{Route, RouteMcp, RouteTable, Scheme, Upstream};

/// Where the packaged service reads its config.
pub const DEFAULT_PATH: &str = "/etc/mcp-tunnel/mcp-tunnel.toml";

/// Log verbosity, with the reference stack's four names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where and how logs are written. `auto`: to the journal with structured fields when stderr
/// is the journal, else human-readable text on stderr; `text`: always text on stderr; `json`:
/// one JSON object per line on stderr, with the journal's field names (for collectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Auto,
    Text,
    Json,
}

/// A validated configuration. Paths are absolute (relative ones resolve against the
/// config file's directory).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub listen_addr: SocketAddr,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub shutdown_timeout: Duration,
    pub tunnel_domain: Option<String>,
    pub tls: TlsFiles,
    pub routes: Vec<Route>,
    pub upstream: UpstreamConfig,
    pub cloudflared: CloudflaredConfig,
    pub certs: CertsConfig,
    /// `[provision]`, when the appliance provisions itself through the Tunnels API.
    pub provision: Option<ProvisionConfig>,
    pub admin: AdminConfig,
    pub limits: Limits,
    /// `[mcp]`: bounds of MCP inspection (routes opt in with `inspect` or a policy).
    pub mcp: McpConfig,
    /// Accept secret files (TLS key, CA key, token) readable by group or others; the
    /// reference stack's container setup needs 0644, an appliance should not.
    pub allow_readable_secrets: bool,
    /// `[peer_check]`: who may connect to `listen_addr`.
    pub peer_check: PeerCheck,
    /// Data-plane workers (one single-threaded runtime each); `None`: one per available
    /// core. Fixed at start.
    pub workers: Option<usize>,
}

/// The inner-TLS server certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// How the proxy reaches upstreams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub ip_policy: IpPolicy,
    pub ca_file: Option<PathBuf>,
    pub include_system_cas: bool,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
}

/// Every problem found in one config file; `Display` prints one `file: field: problem` line
/// per problem so that an operator can fix them all in one pass.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field (`routes.echo`), or a `line:column` position for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.file.display(), p.field, p.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub fn single(file: &Path, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                field: field.to_string(),
                message: message.into(),
            }],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen_addr: Option<String>,
    log_level: Option<LogLevel>,
    log_format: Option<LogFormat>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    shutdown_timeout: Option<Duration>,
    tunnel_domain: Option<String>,
    tls: Option<RawTls>,
    routes: Option<toml::Value>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    cloudflared: cloudflared::RawCloudflared,
    #[serde(default)]
    admin: admin::RawAdmin,
    #[serde(default)]
    limits: limits::RawLimits,
    #[serde(default)]
    mcp: mcp::RawMcp,
    allow_readable_secrets: Option<bool>,
    workers: Option<i64>,
    #[serde(default)]
    certs: certs::RawCerts,
    provision: Option<provision::RawProvision>,
    #[serde(default)]
    peer_check: peer_check::RawPeerCheck,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    allowed_ips: Option<Vec<String>>,
    disable_ip_validation: Option<bool>,
    #[serde(default)]
    tls: RawUpstreamTls,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    response_header_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca_file: Option<PathBuf>,
    include_system_cas: Option<bool>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(path, "(file)", format!("cannot read the config file: {e}"))
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text as if it had been read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(path, text, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut v = Validator {
            problems: Vec::new(),
        };

        let listen_addr = raw
            .listen_addr
            .as_deref()
            .map_or(Ok(default_listen_addr()), parse_listen_addr)
            .unwrap_or_else(|m| v.fail("listen_addr", m, default_listen_addr()));

        let tunnel_domain = raw
            .tunnel_domain
            .map(|d| routes::normalize_name(&d))
            .filter(|d| !d.is_empty());
        if let Some(d) = &tunnel_domain
            && !d.split('.').all(valid_label)
        {
            v.push(
                "tunnel_domain",
                format!(
                    "expected a DNS name such as \"abcd1234.tunnel.anthropic.com\", found {d:?}"
                ),
            );
        }

        // `[provision]` first: it supplies defaults for [tls], tunnel_domain and the token file.
        let provision = raw
            .provision
            .map(|p| p.validate(base, &mut |field, message| v.push(field, message)));
        let mut tunnel_domain = tunnel_domain;
        if let Some(p) = &provision {
            provisioned_domain(&mut v, p, &mut tunnel_domain);
        }

        let tls = match raw.tls {
            None if provision.is_some() => provision.as_ref().map(|p| TlsFiles {
                cert_file: p.state_file("tls.crt"),
                key_file: p.state_file("tls.key"),
            }),
            None => {
                v.push(
                    "tls",
                    "missing: expected a [tls] table with cert_file and key_file",
                );
                None
            }
            Some(t) => {
                let cert = t.cert_file.map(|p| base.join(p));
                let key = t.key_file.map(|p| base.join(p));
                if cert.is_none() {
                    v.push(
                        "tls.cert_file",
                        "missing: expected the path of the server certificate (PEM)",
                    );
                }
                if key.is_none() {
                    v.push(
                        "tls.key_file",
                        "missing: expected the path of the server private key (PEM)",
                    );
                }
                cert.zip(key).map(|(cert_file, key_file)| TlsFiles {
                    cert_file,
                    key_file,
                })
            }
        };

        if let (Some(p), Some(t)) = (&provision, &tls) {
            for (field, path, name) in [
                ("tls.cert_file", &t.cert_file, "tls.crt"),
                ("tls.key_file", &t.key_file, "tls.key"),
            ] {
                if *path != p.state_file(name) {
                    v.push(
                        field,
                        format!(
                            "with [provision] the server certificate is issued and rotated in the state directory: expected {} (or remove [tls])",
                            p.state_file(name).display()
                        ),
                    );
                }
            }
        }

        let routes = match raw.routes {
            None => {
                v.push(
                    "routes",
                    "missing: expected a [routes] table of name = \"scheme://host:port\"",
                );
                Vec::new()
            }
            // With [provision] the domain comes from the state directory once provisioned.
            Some(value) => {
                parse_routes(&mut v, value, tunnel_domain.as_deref(), provision.is_some())
            }
        };

        let up = raw.upstream;
        let ip_policy = match (up.allowed_ips, up.disable_ip_validation.unwrap_or(false)) {
            (Some(_), true) => {
                v.push(
                    "upstream.allowed_ips",
                    "allowed_ips and disable_ip_validation are mutually exclusive: remove one of them",
                );
                IpPolicy::default()
            }
            (None, true) => IpPolicy::Disabled,
            (None, false) => IpPolicy::default(),
            (Some(list), false) => {
                let mut nets = Vec::new();
                for (i, entry) in list.iter().enumerate() {
                    match ipset::parse_entry(entry) {
                        Ok(n) => nets.push(n),
                        Err(m) => v.push(&format!("upstream.allowed_ips[{i}]"), m),
                    }
                }
                if list.is_empty() {
                    v.push(
                        "upstream.allowed_ips",
                        "empty list would refuse every upstream: list at least one CIDR, or remove the field for the RFC 1918 default",
                    );
                }
                IpPolicy::Allow(nets)
            }
        };
        let ca_file = up.tls.ca_file.map(|p| base.join(p));
        let include_system_cas = up.tls.include_system_cas.unwrap_or(false);
        if ca_file.is_none() && !include_system_cas {
            for r in routes.iter().filter(|r| r.upstream.scheme == Scheme::Https) {
                v.push(
                    &format!("routes.{}", r.name),
                    "an https upstream needs a trust anchor: set upstream.tls.ca_file or upstream.tls.include_system_cas = true",
                );
            }
        }

        let mut section_problems = Vec::new();
        let certs = raw.certs.validate(base, &mut section_problems);
        for (field, message) in section_problems {
            v.push(&field, message);
        }
        let mut cloudflared = cloudflared::validate(raw.cloudflared, base, &mut v);
        if let Some(p) = &provision {
            for (field, set) in [
                ("certs.ca_cert_file", certs.ca_cert_file.is_some()),
                ("certs.ca_key_file", certs.ca_key_file.is_some()),
            ] {
                if set {
                    v.push(
                        field,
                        format!(
                            "with [provision] the tunnel CA is {} and the appliance rotates it: remove {field}",
                            p.state_file("ca.crt").display()
                        ),
                    );
                }
            }
            let token = p.state_file("tunnel-token");
            match &cloudflared.token_file {
                None => cloudflared.token_file = Some(token),
                Some(t) if *t == token => {}
                Some(_) => v.push(
                    "cloudflared.token_file",
                    format!(
                        "with [provision] the tunnel token is written (and rotated) to {}: remove cloudflared.token_file or set it to that path",
                        token.display()
                    ),
                ),
            }
        }
        let admin = admin::validate(raw.admin, &mut v);
        let limits = limits::validate(raw.limits, &mut v);
        let peer_check =
            peer_check::validate(raw.peer_check, listen_addr, cloudflared.enabled, &mut v);
        let mcp = mcp::validate(raw.mcp, &mut v);
        let workers = match raw.workers {
            None => None,
            Some(n @ 1..=MAX_WORKERS) => Some(n as usize),
            Some(n) => v.fail(
                "workers",
                format!("expected a number of data-plane workers from 1 to {MAX_WORKERS} (or leave it out: one per core), got {n}"),
                None,
            ),
        };
        let config = Config {
            path: path.to_path_buf(),
            listen_addr,
            log_level: raw.log_level.unwrap_or_default(),
            log_format: raw.log_format.unwrap_or_default(),
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(Duration::from_secs(30)),
            tunnel_domain,
            tls: tls.unwrap_or_else(|| TlsFiles {
                cert_file: PathBuf::new(),
                key_file: PathBuf::new(),
            }),
            routes,
            upstream: UpstreamConfig {
                ip_policy,
                ca_file,
                include_system_cas,
                connect_timeout: up.connect_timeout.unwrap_or(Duration::from_secs(10)),
                response_header_timeout: up
                    .response_header_timeout
                    .unwrap_or(Duration::from_secs(300)),
            },
            cloudflared,
            admin,
            limits,
            mcp,
            allow_readable_secrets: raw.allow_readable_secrets.unwrap_or(false),
            workers,
            certs,
            provision,
            peer_check,
        };
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: path.to_path_buf(),
                problems: v.problems,
            })
        }
    }

    /// Full hostnames the server certificate must cover (bare keys joined to the domain).
    pub fn route_hosts(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|r| match &self.tunnel_domain {
                Some(d) => full_name(&r.name, d),
                None => r.name.clone(),
            })
            .collect()
    }

    /// The route table for this config.
    pub fn route_table(&self) -> RouteTable {
        RouteTable::new(self.routes.clone(), self.tunnel_domain.as_deref())
    }
}

/// With `[provision]`: `tunnel_domain` defaults to the state directory's `tunnel-domain`
/// (absent until provisioned); a configured value must agree with it.
fn provisioned_domain(v: &mut Validator, p: &ProvisionConfig, domain: &mut Option<String>) {
    let path = p.state_file("tunnel-domain");
    let stored = std::fs::read_to_string(&path)
        .ok()
        .map(|d| routes::normalize_name(d.trim()))
        .filter(|d| !d.is_empty());
    match (domain.as_ref(), stored) {
        (None, stored) => *domain = stored,
        (Some(d), Some(s)) if *d != s => v.push(
            "tunnel_domain",
            format!(
                "{d:?} differs from the provisioned domain {s:?} in {}: remove tunnel_domain (it defaults to the provisioned one)",
                path.display()
            ),
        ),
        _ => {}
    }
}

/// Loopback only by default: the listener carries plaintext and only cloudflared should reach it.
/// Most data-plane workers `workers` may ask for (far beyond any VM's cores: a typo guard).
pub const MAX_WORKERS: i64 = 256;

pub fn default_listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    // The reference writes ":8080" (Go form) for "every interface".
    if let Some(port) = s.strip_prefix(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    s.parse().map_err(|_| {
        format!("expected an IP address and port such as \"127.0.0.1:8080\", found {s:?}")
    })
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The hostname the edge sends for route key `name`: the key itself when it already is the
/// domain or a name under it, else the key joined to the domain.
fn full_name(name: &str, domain: &str) -> String {
    if name == domain || name.strip_suffix(domain).is_some_and(|s| s.ends_with('.')) {
        name.to_string()
    } else {
        format!("{name}.{domain}")
    }
}

/// `domain_later`: bare keys are fine without a domain yet (`[provision]` supplies it).
fn parse_routes(
    v: &mut Validator,
    value: toml::Value,
    domain: Option<&str>,
    domain_later: bool,
) -> Vec<Route> {
    let have_domain = domain.is_some() || domain_later;
    let table = match value {
        toml::Value::Table(t) => t,
        other => {
            v.push(
                "routes",
                format!(
                    "expected a table of name = \"scheme://host:port\" entries, found {} (routes is a map, not a list)",
                    type_name(&other)
                ),
            );
            return Vec::new();
        }
    };
    let mut out: Vec<Route> = Vec::new();
    for (key, value) in table {
        let field = format!("routes.{key}");
        let name = routes::normalize_name(&key);
        if name.is_empty() || !name.split('.').all(valid_label) {
            v.push(
                &field,
                "expected a subdomain (\"echo\") or a full hostname as the key",
            );
            continue;
        }
        if !have_domain && !name.contains('.') {
            v.push(
                &field,
                "a bare subdomain key needs tunnel_domain; set tunnel_domain or use the full hostname as the key",
            );
        }
        if out.iter().any(|r| r.name == name) {
            v.push(
                &field,
                format!(
                    "duplicate route: {name:?} is already configured (keys are case-insensitive)"
                ),
            );
            continue;
        }
        let (upstream, preserve_host, mcp) = match value {
            toml::Value::String(s) => (s, false, RouteMcp::default()),
            toml::Value::Table(mut t) => {
                let preserve = match t.remove("preserve_host") {
                    None => false,
                    Some(toml::Value::Boolean(b)) => b,
                    Some(other) => {
                        v.push(
                            &format!("{field}.preserve_host"),
                            format!("expected true or false, found {}", type_name(&other)),
                        );
                        false
                    }
                };
                let up = match t.remove("upstream") {
                    Some(toml::Value::String(s)) => s,
                    _ => {
                        v.push(
                            &format!("{field}.upstream"),
                            "missing: expected upstream = \"scheme://host:port\"",
                        );
                        continue;
                    }
                };
                let mcp =
                    RouteMcp::from_table(&mut t, &mut |f, m| v.push(&format!("{field}.{f}"), m));
                if let Some(unknown) = t.keys().next() {
                    v.push(
                        &format!("{field}.{unknown}"),
                        format!(
                            "unknown field, expected `upstream`, `preserve_host` or one of {}",
                            RouteMcp::FIELDS.join(", ")
                        ),
                    );
                }
                (up, preserve, mcp)
            }
            other => {
                v.push(
                    &field,
                    format!("expected \"scheme://host:port\" or a table {{ upstream = \"...\", preserve_host = true }}, found {}", type_name(&other)),
                );
                continue;
            }
        };
        match Upstream::parse(&upstream) {
            Ok(upstream) => out.push(Route {
                name,
                upstream,
                preserve_host,
                mcp,
            }),
            Err(m) => v.push(&field, m),
        }
    }
    // Exact names are matched first, so a key whose full name is also configured as a key
    // could never be reached through the edge.
    if let Some(d) = domain {
        for r in &out {
            let full = full_name(&r.name, d);
            if full != r.name && out.iter().any(|o| o.name == full) {
                v.push(
                    &format!("routes.{}", r.name),
                    format!("unreachable: {full:?} is also configured as a route key, and an exact hostname takes precedence; keep one of the two"),
                );
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let field = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {col}")
        }
        None => "(file)".to_string(),
    };
    ConfigError::single(path, &field, e.message().trim().to_string())
}

struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn fail<T>(&mut self, field: &str, message: String, fallback: T) -> T {
        self.push(field, message);
        fallback
    }
}

//! `mcp-tunnel explain URL`: what the proxy would do with a request for that URL, step by
//! step, computed by the data path's own functions: the route lookup
//! ([`RouteTable::find`], which `lookup` is), the upstream request
//! ([`proxy::upstream_uri`](crate::proxy::upstream_uri), [`proxy::upstream_host`](crate::proxy::upstream_host)),
//! name resolution and the address policy ([`upstream::resolve`] and
//! [`IpPolicy::check_all`], which `resolve_checked` is, plus [`IpPolicy::verdict`] for the
//! rule behind each address), and the certificate's SAN rule ([`preflight::san_covers`]).

use std::fmt::Write;
use std::sync::Arc;

use serde::Serialize;

use crate::certs::preflight::{self, CertFacts};
use crate::config::routes::{Miss, Outcome};
use crate::config::{Config, IpPolicy, RouteTable};
use crate::proxy::Answer;
use crate::proxy::upstream::{self, ConnectError, Resolve};

/// The inputs the data path decides from.
pub struct Explainer {
    routes: RouteTable,
    policy: IpPolicy,
    resolver: Arc<dyn Resolve>,
    certificate: Option<Result<(String, CertFacts), String>>,
    now: i64,
}

/// Which route, and why.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStep {
    /// The route key that matched.
    pub matched: Option<String>,
    /// `exact`, `subdomain` or `none`.
    pub rule: &'static str,
    pub detail: String,
    /// Route keys close to what was asked, when nothing matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub near_misses: Vec<String>,
}

/// The request that would go upstream.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStep {
    pub url: String,
    pub host_header: String,
    pub preserve_host: bool,
    pub x_forwarded_host: String,
}

/// One resolved address and the rule that decided about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressVerdict {
    pub ip: std::net::IpAddr,
    pub allowed: bool,
    pub rule: String,
}

/// The upstream's addresses.
#[derive(Debug, Clone, Serialize)]
pub struct AddressStep {
    pub host: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub verdicts: Vec<AddressVerdict>,
    /// The address the data path refuses the whole answer for (a mixed answer fails closed).
    pub refused: Option<std::net::IpAddr>,
}

/// The certificate the proxy presents (one for every name).
#[derive(Debug, Clone, Serialize)]
pub struct CertificateStep {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sans: Vec<String>,
    /// The SAN entry that covers the name, if any.
    pub covered_by: Option<String>,
    pub days_left: Option<i64>,
}

/// Everything `explain` found.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub input: String,
    /// The `Host` / `:authority` the request would carry.
    pub host: String,
    pub path: String,
    /// The name as compared (no port, no trailing dot, lowercase).
    pub name: String,
    pub route: RouteStep,
    pub upstream: Option<UpstreamStep>,
    pub addresses: Option<AddressStep>,
    pub certificate: Option<CertificateStep>,
    /// Whether the proxy would forward the request.
    pub forwarded: bool,
    pub outcome: String,
}

impl Explainer {
    /// From the parts the data path decides with (no certificate): what the property tests
    /// drive with generated tables, allowlists and DNS answers.
    pub fn new(routes: RouteTable, policy: IpPolicy, resolver: Arc<dyn Resolve>) -> Explainer {
        Explainer {
            routes,
            policy,
            resolver,
            certificate: None,
            now: 0,
        }
    }

    /// From a config, with the certificate file it names.
    pub fn from_config(config: &Config, resolver: Arc<dyn Resolve>, now: i64) -> Explainer {
        let file = config.tls.cert_file.display().to_string();
        let certificate = crate::certs::load_certs("tls.cert_file", &config.tls.cert_file)
            .map_err(|e| e.to_string())
            .and_then(|c| preflight::facts(&c[0]).map_err(|e| e.to_string()))
            .map(|f| (file, f));
        Explainer {
            routes: config.route_table(),
            policy: config.upstream.ip_policy.clone(),
            resolver,
            certificate: Some(certificate),
            now,
        }
    }

    /// Explains a URL (`https://echo.<domain>/mcp`) or a bare `Host` value.
    pub async fn explain(&self, input: &str) -> Explanation {
        let (host, path) = split(input);
        let found = self.routes.find(&host);
        let route = found.route().cloned();
        let step = route_step(&self.routes, &found.name, &found.outcome);
        let certificate = self.certificate.as_ref().map(|c| match c {
            Ok((file, f)) => CertificateStep {
                file: file.clone(),
                error: None,
                sans: f.dns_names.clone(),
                covered_by: f
                    .dns_names
                    .iter()
                    .find(|s| preflight::san_covers(s, &found.name))
                    .cloned(),
                days_left: Some((f.not_after - self.now).div_euclid(86400)),
            },
            Err(e) => CertificateStep {
                file: String::new(),
                error: Some(e.clone()),
                sans: Vec::new(),
                covered_by: None,
                days_left: None,
            },
        });
        let Some(route) = route else {
            return Explanation {
                input: input.to_string(),
                host,
                path,
                name: found.name.clone(),
                route: step,
                upstream: None,
                addresses: None,
                certificate,
                forwarded: false,
                outcome: format!(
                    "{} (log: {})",
                    Answer::NoRoute.describe(),
                    Answer::NoRoute.log_line()
                ),
            };
        };
        let uri = crate::proxy::upstream_uri(&route, &path);
        let up = UpstreamStep {
            url: uri.to_string(),
            host_header: crate::proxy::upstream_host(&route, &host),
            preserve_host: route.preserve_host,
            x_forwarded_host: host.clone(),
        };
        let u = &route.upstream;
        let mut addresses = AddressStep {
            host: u.host.clone(),
            port: u.port,
            error: None,
            verdicts: Vec::new(),
            refused: None,
        };
        let outcome = match upstream::resolve(self.resolver.as_ref(), &u.host, u.port).await {
            Err(e) => {
                addresses.error = Some(e.to_string());
                format!("{} ({e})", Answer::ConnectFailed.describe())
            }
            Ok(addrs) => {
                let ips: Vec<std::net::IpAddr> = addrs.iter().map(|a| a.ip()).collect();
                addresses.verdicts = ips
                    .iter()
                    .map(|ip| {
                        let v = self.policy.verdict(*ip);
                        AddressVerdict {
                            ip: ip.to_canonical(),
                            allowed: v.is_allowed(),
                            rule: super::routes::rule(&self.policy, v),
                        }
                    })
                    .collect();
                match self.policy.check_all(&ips) {
                    Err(ip) => {
                        addresses.refused = Some(ip);
                        let log = ConnectError::NotAllowed {
                            host: u.host.clone(),
                            ip,
                        };
                        format!("{} (log: {log})", Answer::AddressNotAllowed.describe())
                    }
                    Ok(()) => format!(
                        "forwarded to {} (the proxy dials only these checked addresses)",
                        up.url
                    ),
                }
            }
        };
        let forwarded = addresses.error.is_none() && addresses.refused.is_none();
        Explanation {
            input: input.to_string(),
            host,
            path,
            name: found.name.clone(),
            route: step,
            upstream: Some(up),
            addresses: Some(addresses),
            certificate,
            forwarded,
            outcome,
        }
    }
}

/// `(Host value, path and query)` from a URL, or a bare host with path `/`.
fn split(input: &str) -> (String, String) {
    let input = input.trim();
    if input.contains("://")
        && let Ok(uri) = input.parse::<http::Uri>()
        && let Some(a) = uri.authority()
    {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let path = if path.is_empty() { "/" } else { path };
        return (a.as_str().to_string(), path.to_string());
    }
    (input.to_string(), "/".to_string())
}

fn route_step(table: &RouteTable, name: &str, outcome: &Outcome<'_>) -> RouteStep {
    let domain = table.tunnel_domain();
    let keys: Vec<&str> = table.iter().map(|r| r.name.as_str()).collect();
    match outcome {
        Outcome::Exact(r) => RouteStep {
            matched: Some(r.name.clone()),
            rule: "exact",
            detail: format!("{name:?} is a route key (exact hostnames are tried first)"),
            near_misses: Vec::new(),
        },
        Outcome::Subdomain(r) => RouteStep {
            matched: Some(r.name.clone()),
            rule: "subdomain",
            detail: format!(
                "{name:?} is not a key; with tunnel_domain {:?} stripped, {:?} is",
                domain.unwrap_or(""),
                r.name
            ),
            near_misses: Vec::new(),
        },
        Outcome::Miss(miss) => {
            let (detail, probe) = match miss {
                Miss::EmptyName => ("no hostname".to_string(), String::new()),
                Miss::NoTunnelDomain => (
                    format!(
                        "{name:?} is not a route key, and without tunnel_domain only exact keys match"
                    ),
                    name.to_string(),
                ),
                Miss::NotUnderDomain => (
                    format!(
                        "{name:?} is not a route key and not under tunnel_domain {:?}",
                        domain.unwrap_or("")
                    ),
                    name.split('.').next().unwrap_or("").to_string(),
                ),
                Miss::DomainItself => (
                    format!("{name:?} is the tunnel domain itself, which names no route"),
                    String::new(),
                ),
                Miss::NoSuchKey(sub) => (
                    format!(
                        "{name:?} is not a route key; the subdomain {sub:?} left after stripping {:?} is not one either (a key matches the whole subdomain)",
                        domain.unwrap_or("")
                    ),
                    sub.clone(),
                ),
            };
            let near_misses = if probe.is_empty() {
                Vec::new()
            } else {
                near(&keys, &probe, name)
                    .into_iter()
                    .map(|k| match domain {
                        Some(d) if !k.contains('.') => format!("{k} ({k}.{d})"),
                        _ => k,
                    })
                    .collect()
            };
            RouteStep {
                matched: None,
                rule: "none",
                detail,
                near_misses,
            }
        }
    }
}

/// Keys within two edits of `probe` (or of the whole name), or sharing its last label.
fn near(keys: &[&str], probe: &str, name: &str) -> Vec<String> {
    let mut out: Vec<String> = keys
        .iter()
        .filter(|k| {
            edits(k, probe) <= 2
                || edits(k, name) <= 2
                || probe.rsplit('.').next() == Some(**k)
                || probe.split('.').next() == Some(**k)
        })
        .map(|k| k.to_string())
        .collect();
    out.sort();
    out.truncate(5);
    out
}

/// Levenshtein distance (small strings only: route keys).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Explanation {
    /// The human rendering.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "request      {} (Host {}, path {})",
            self.input, self.host, self.path
        );
        let r = &self.route;
        match &r.matched {
            Some(m) => {
                let _ = writeln!(o, "route        {m} ({} match): {}", r.rule, r.detail);
            }
            None => {
                let _ = writeln!(o, "route        none: {}", r.detail);
                if !r.near_misses.is_empty() {
                    let _ = writeln!(o, "near misses  {}", r.near_misses.join(", "));
                }
            }
        }
        if let Some(u) = &self.upstream {
            let _ = writeln!(
                o,
                "upstream     {} with Host: {}{} and X-Forwarded-Host: {}, X-Forwarded-Proto: https",
                u.url,
                u.host_header,
                if u.preserve_host {
                    " (preserve_host = true)"
                } else {
                    " (the upstream's own; preserve_host = false)"
                },
                u.x_forwarded_host
            );
        }
        if let Some(a) = &self.addresses {
            match &a.error {
                Some(e) => {
                    let _ = writeln!(o, "addresses    {e}");
                }
                None => {
                    for v in &a.verdicts {
                        let _ = writeln!(
                            o,
                            "address      {} {} {} ({})",
                            if a.host.parse::<std::net::IpAddr>().is_ok() {
                                "literal".to_string()
                            } else {
                                format!("{} ->", a.host)
                            },
                            v.ip,
                            if v.allowed { "allowed" } else { "REFUSED" },
                            v.rule
                        );
                    }
                }
            }
        }
        if let Some(c) = &self.certificate {
            match (&c.error, &c.covered_by) {
                (Some(e), _) => {
                    let _ = writeln!(o, "certificate  {e}");
                }
                (None, Some(san)) => {
                    let _ = writeln!(
                        o,
                        "certificate  {}: SAN {san} covers {} ({} days left)",
                        c.file,
                        self.name,
                        c.days_left.unwrap_or(0)
                    );
                }
                (None, None) => {
                    let _ = writeln!(
                        o,
                        "certificate  {}: SAN {:?} does NOT cover {}: the edge's handshake for this name fails",
                        c.file, c.sans, self.name
                    );
                }
            }
        }
        let _ = writeln!(o, "outcome      {}", self.outcome);
        o
    }
}

/// `mcp-tunnel explain`: exit 0 when the request would be forwarded, 1 when refused, 78 for
/// an unusable config.
pub fn main(config: &std::path::Path, url: &str, json: bool) -> u8 {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return crate::cli::EXIT_CONFIG;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let explainer = Explainer::from_config(
        &config,
        Arc::new(upstream::SystemResolver),
        crate::supervisor::reload::unix_now(),
    );
    let e = rt.block_on(explainer.explain(url));
    if json {
        println!("{:#}", serde_json::to_value(&e).unwrap_or_default());
    } else {
        print!("{}", e.text());
    }
    u8::from(!e.forwarded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls_and_hosts() {
        assert_eq!(
            split("https://Echo.t.example:8443/mcp?x=1"),
            ("Echo.t.example:8443".into(), "/mcp?x=1".into())
        );
        assert_eq!(
            split("https://echo.t.example"),
            ("echo.t.example".into(), "/".into())
        );
        assert_eq!(
            split("echo.t.example."),
            ("echo.t.example.".into(), "/".into())
        );
    }

    #[test]
    fn edit_distance() {
        assert_eq!(edits("echo", "echo"), 0);
        assert_eq!(edits("echo", "ecoh"), 2);
        assert_eq!(edits("echo", "wiki"), 4);
        assert_eq!(edits("", "ab"), 2);
    }
}

//! The route table: which upstream serves which hostname, and the matching rules.
//!
//! Matching follows the reference proxy (exact full hostname first, then the subdomain left
//! after stripping `tunnel_domain`) and settles what it leaves open: comparison is
//! case-insensitive, and a port or a trailing dot on the incoming name is ignored.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::mcp::{Pattern, Policy};

/// Upstream scheme: the reference accepts exactly these two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A parsed `scheme://host:port` upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    /// Host as written (DNS name or IP literal, without IPv6 brackets), lowercased.
    pub host: String,
    pub port: u16,
}

impl Upstream {
    /// The reference proxy's wording, kept so operators can search for it.
    pub const FORMAT_ERROR: &'static str = "invalid upstream (must be scheme://host:port)";

    /// Parses exactly `scheme://host:port`; the `Err` says what was wrong with the value.
    pub fn parse(value: &str) -> Result<Upstream, String> {
        let fail = |why: &str| Err(format!("{} : {value:?} {why}", Self::FORMAT_ERROR));
        let Some((scheme, rest)) = value.split_once("://") else {
            return fail("has no scheme");
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return fail("has a scheme other than http or https"),
        };
        if let Some(pos) = rest.find(['/', '?', '#']) {
            return fail(if rest.as_bytes()[pos] == b'/' {
                "has a path (put the path in the connector URL instead)"
            } else {
                "has a query or fragment"
            });
        }
        if rest.contains('@') {
            return fail("has user information");
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let Some((host, after)) = v6.split_once(']') else {
                return fail("has an unclosed IPv6 bracket");
            };
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return fail("has an invalid IPv6 address");
            }
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let Some(port) = port else {
            return fail("has no port");
        };
        let Ok(port) = port.parse::<u16>() else {
            return fail("has an invalid port");
        };
        if port == 0 {
            return fail("has port 0");
        }
        if host.is_empty() || !valid_host(host) {
            return fail("has an invalid host");
        }
        Ok(Upstream {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// `host:port` as it goes into a URI or a `Host` header (IPv6 bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())
    }
}

fn valid_host(host: &str) -> bool {
    host.parse::<std::net::Ipv6Addr>().is_ok()
        || host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// One configured route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The key as configured (normalised): a bare subdomain or a full hostname.
    pub name: String,
    pub upstream: Upstream,
    /// Send the caller's `Host` upstream instead of the upstream's own authority.
    pub preserve_host: bool,
    /// MCP inspection and tool policy.
    pub mcp: RouteMcp,
}

/// What the proxy does with a route's MCP traffic. Off by default: a route without it is
/// forwarded without looking at its bodies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMcp {
    /// Audit log line per MCP message and per-method/per-tool metrics (`inspect = true`;
    /// implied by a policy).
    pub inspect: bool,
    /// `tools_allow` / `tools_deny` / `methods_deny`; `None` when none is set.
    pub policy: Option<Policy>,
    /// Log the names (never the values) of a `tools/call`'s arguments.
    pub log_argument_names: bool,
}

impl RouteMcp {
    /// Route fields (besides `upstream` and `preserve_host`) this module reads.
    pub const FIELDS: [&'static str; 5] = [
        "inspect",
        "tools_allow",
        "tools_deny",
        "methods_deny",
        "log_argument_names",
    ];

    /// How the route's MCP traffic is read, for `doctor`, `status` and the status page:
    /// `policy`, `audited`, or `not audited` (forwarded without being read).
    pub fn audit_label(&self) -> &'static str {
        match (&self.policy, self.inspect) {
            (Some(_), _) => "policy",
            (None, true) => "audited",
            (None, false) => "not audited",
        }
    }

    /// Whether the proxy reads this route's MCP messages at all.
    pub fn active(&self) -> bool {
        self.inspect || self.policy.is_some()
    }

    /// Takes the MCP fields out of a route table; `problem(field, message)` gets each
    /// invalid one, with `field` relative to the route (`tools_deny[2]`).
    pub fn from_table(
        table: &mut toml::map::Map<String, toml::Value>,
        problem: &mut dyn FnMut(String, String),
    ) -> RouteMcp {
        let mut flag =
            |name: &str, problem: &mut dyn FnMut(String, String)| match table.remove(name) {
                None => None,
                Some(toml::Value::Boolean(b)) => Some(b),
                Some(other) => {
                    problem(
                        name.into(),
                        format!("expected true or false, found {}", other.type_str()),
                    );
                    None
                }
            };
        let inspect = flag("inspect", problem);
        let log_argument_names = flag("log_argument_names", problem);
        let mut list = |name: &str| -> Option<Vec<Pattern>> {
            let value = table.remove(name)?;
            let toml::Value::Array(items) = value else {
                problem(
                    name.into(),
                    format!(
                        "expected a list of tool or method names (globs with * and ?), found {}",
                        value.type_str()
                    ),
                );
                return None;
            };
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().map(Pattern::parse) {
                    Some(Ok(p)) => out.push(p),
                    Some(Err(m)) => problem(format!("{name}[{i}]"), m),
                    None => problem(
                        format!("{name}[{i}]"),
                        format!("expected a name or glob string, found {}", item.type_str()),
                    ),
                }
            }
            Some(out)
        };
        let tools_allow = list("tools_allow");
        let tools_deny = list("tools_deny");
        let methods_deny = list("methods_deny");
        let policy = (tools_allow.is_some() || tools_deny.is_some() || methods_deny.is_some())
            .then(|| Policy {
                tools_allow,
                tools_deny: tools_deny.unwrap_or_default(),
                methods_deny: methods_deny.unwrap_or_default(),
            });
        if policy.is_some() && inspect == Some(false) {
            problem(
                "inspect".into(),
                "a route with tools_allow, tools_deny or methods_deny is always inspected (the policy needs to read each message): remove inspect = false".into(),
            );
        }
        let inspect = inspect.unwrap_or(false) || policy.is_some();
        let log_argument_names = log_argument_names.unwrap_or(false);
        if log_argument_names && !inspect {
            problem(
                "log_argument_names".into(),
                "argument names are logged by the audit log, which needs inspect = true (or a policy) on this route".into(),
            );
        }
        RouteMcp {
            inspect,
            policy,
            log_argument_names,
        }
    }
}

/// Immutable lookup table, built once per config snapshot.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: HashMap<String, Arc<Route>>,
    /// Lowercased, without trailing dot; `None` when routes are full hostnames only.
    tunnel_domain: Option<String>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>, tunnel_domain: Option<&str>) -> RouteTable {
        RouteTable {
            routes: routes
                .into_iter()
                .map(|r| (r.name.clone(), Arc::new(r)))
                .collect(),
            tunnel_domain: tunnel_domain.map(normalize_name).filter(|d| !d.is_empty()),
        }
    }

    /// Finds the route for an incoming `Host` / `:authority` / SNI value.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        self.find(host).route()
    }

    /// The lookup with its steps: which rule matched, or where matching stopped. `lookup` is
    /// this function, so `explain` reports what the data path does, not a model of it.
    pub fn find(&self, host: &str) -> Lookup<'_> {
        let name = normalize_host(host);
        let outcome = self.outcome(&name);
        Lookup { name, outcome }
    }

    fn outcome(&self, name: &str) -> Outcome<'_> {
        if name.is_empty() {
            return Outcome::Miss(Miss::EmptyName);
        }
        if let Some(route) = self.routes.get(name) {
            return Outcome::Exact(route);
        }
        let Some(domain) = self.tunnel_domain.as_deref() else {
            return Outcome::Miss(Miss::NoTunnelDomain);
        };
        let Some(sub) = name.strip_suffix(domain).and_then(|s| s.strip_suffix('.')) else {
            return Outcome::Miss(if name == domain {
                Miss::DomainItself
            } else {
                Miss::NotUnderDomain
            });
        };
        match self.routes.get(sub) {
            Some(route) if !sub.is_empty() => Outcome::Subdomain(route),
            _ => Outcome::Miss(Miss::NoSuchKey(sub.to_string())),
        }
    }

    /// The tunnel domain as matched (lowercase, no trailing dot).
    pub fn tunnel_domain(&self) -> Option<&str> {
        self.tunnel_domain.as_deref()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// One lookup, step by step (see [`RouteTable::find`]).
#[derive(Debug, Clone)]
pub struct Lookup<'a> {
    /// The name as compared: port, IPv6 brackets and one trailing dot removed, lowercased.
    pub name: String,
    pub outcome: Outcome<'a>,
}

impl<'a> Lookup<'a> {
    /// The route the request goes to, as `RouteTable::lookup` returns it.
    pub fn route(&self) -> Option<&'a Arc<Route>> {
        match self.outcome {
            Outcome::Exact(r) | Outcome::Subdomain(r) => Some(r),
            Outcome::Miss(_) => None,
        }
    }
}

/// Which rule selected the route, or why none did.
#[derive(Debug, Clone)]
pub enum Outcome<'a> {
    /// The whole name is a route key.
    Exact(&'a Arc<Route>),
    /// The label(s) left after stripping `.<tunnel_domain>` are a route key (the route's name).
    Subdomain(&'a Arc<Route>),
    Miss(Miss),
}

/// Why no route matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// Nothing left after removing the port and trailing dot.
    EmptyName,
    /// Not a key, and without `tunnel_domain` only exact keys match.
    NoTunnelDomain,
    /// Not a key and not a name under `tunnel_domain`.
    NotUnderDomain,
    /// The bare tunnel domain names no route.
    DomainItself,
    /// Under `tunnel_domain`, but the subdomain (here) is no key.
    NoSuchKey(String),
}

/// Lowercases and drops one trailing dot: `Echo.Example.COM.` -> `echo.example.com`.
pub fn normalize_name(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Strips a port (and IPv6 brackets) from a `Host` value, then normalises it.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let bare = if let Some(v6) = host.strip_prefix('[') {
        v6.split_once(']').map_or(v6, |(h, _)| h)
    } else if host.matches(':').count() == 1 {
        host.split_once(':').map_or(host, |(h, _)| h)
    } else {
        host
    };
    normalize_name(bare)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(domain: Option<&str>, names: &[&str]) -> RouteTable {
        let routes = names
            .iter()
            .map(|n| Route {
                name: n.to_string(),
                upstream: Upstream::parse(&format!("http://{n}-up:9000")).unwrap(),
                preserve_host: false,
                mcp: RouteMcp::default(),
            })
            .collect();
        RouteTable::new(routes, domain)
    }

    #[test]
    fn matching_table() {
        let t = table(
            Some("Tunnel.Example.com."),
            &["echo", "wiki.internal.example.org", "a.b"],
        );
        let cases: &[(&str, Option<&str>)] = &[
            ("echo.tunnel.example.com", Some("echo")),
            ("ECHO.Tunnel.Example.COM", Some("echo")),
            ("echo.tunnel.example.com.", Some("echo")),
            ("echo.tunnel.example.com:443", Some("echo")),
            ("echo.tunnel.example.com.:8443", Some("echo")),
            ("echo", Some("echo")),
            (
                "wiki.internal.example.org",
                Some("wiki.internal.example.org"),
            ),
            (
                "WIKI.internal.example.org:443",
                Some("wiki.internal.example.org"),
            ),
            ("a.b.tunnel.example.com", Some("a.b")),
            ("b.tunnel.example.com", None),
            ("tunnel.example.com", None),
            (".tunnel.example.com", None),
            ("xecho.tunnel.example.com", None),
            ("echotunnel.example.com", None),
            ("echo.tunnel.example.com.evil.net", None),
            ("echo.other.example.com", None),
            ("", None),
            ("[::1]:443", None),
        ];
        for (host, want) in cases {
            let got = t.lookup(host).map(|r| r.name.as_str());
            assert_eq!(got, *want, "host {host:?}");
        }
    }

    #[test]
    fn without_tunnel_domain_only_exact_names_match() {
        let t = table(None, &["echo.tunnel.example.com", "echo"]);
        assert_eq!(
            t.lookup("echo.tunnel.example.com").unwrap().name,
            "echo.tunnel.example.com"
        );
        assert!(t.lookup("other.tunnel.example.com").is_none());
    }

    #[test]
    fn upstream_accepts_exact_form() {
        let u = Upstream::parse("http://hello-mcp:9000").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Http, "hello-mcp", 9000)
        );
        let u = Upstream::parse("HTTPS://10.0.12.7:8443").unwrap();
        assert_eq!(u.to_string(), "https://10.0.12.7:8443");
        let u = Upstream::parse("http://[fd00::1]:80").unwrap();
        assert_eq!(u.authority(), "[fd00::1]:80");
    }

    #[test]
    fn upstream_refuses_everything_else() {
        for (bad, why) in [
            ("http://hello:9000/mcp", "has a path"),
            ("http://hello:9000/", "has a path"),
            ("http://hello", "has no port"),
            ("hello:9000", "has no scheme"),
            ("ftp://hello:21", "other than http"),
            ("http://hello:99999", "invalid port"),
            ("http://hello:0", "port 0"),
            ("http://user@hello:80", "user information"),
            ("http://hello:80?x=1", "query"),
            ("http://:80", "invalid host"),
            ("http://hel lo:80", "invalid host"),
        ] {
            let err = Upstream::parse(bad).unwrap_err();
            assert!(err.starts_with(Upstream::FORMAT_ERROR), "{bad}: {err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}

//! The reference proxy's `config/mcp-proxy.yaml`, read as the reference reads it (spec 9.1),
//! with its well-known errors worded as it words them (spec 8, 9.2): `routes` written as a
//! list is `cannot unmarshal !!seq into map[string]string`, an upstream with a path or no
//! port is `invalid upstream (must be scheme://host:port)`. Every problem names the line.

use super::yaml::{self, Node, Value};
use crate::config::Upstream;

/// The fields of the reference config (all optional here; the importer decides).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RefConfig {
    pub listen_addr: Option<String>,
    pub log_level: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub tunnel_domain: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// Route key and upstream, in file order.
    pub routes: Vec<(String, String)>,
    pub allowed_ips: Option<Vec<String>>,
    pub disable_ip_validation: Option<bool>,
    pub upstream_ca_file: Option<String>,
    pub include_system_cas: Option<bool>,
}

/// One problem: the line (0: the whole file), the field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefProblem {
    pub line: usize,
    pub field: String,
    pub message: String,
}

struct Reader {
    problems: Vec<RefProblem>,
}

impl Reader {
    fn push(&mut self, node: &Node, field: &str, message: impl Into<String>) {
        self.problems.push(RefProblem {
            line: node.line,
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// A string field: any scalar; a list or map is yaml.v3's `cannot unmarshal`.
    fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match node.scalar() {
            Some(s) => Some(s.to_string()),
            None if node.tag() == "!!null" => None,
            None => {
                self.push(
                    node,
                    field,
                    format!("cannot unmarshal {} into string", node.tag()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, field: &str) -> Option<bool> {
        let b = node.boolean();
        if b.is_none() && node.tag() != "!!null" {
            let shown = node.scalar().map(|s| format!(" `{s}`")).unwrap_or_default();
            self.push(
                node,
                field,
                format!("cannot unmarshal {}{shown} into bool", node.tag()),
            );
        }
        b
    }

    /// The entries of a map field; anything else is `cannot unmarshal X into TYPE`.
    fn map<'a>(&mut self, node: &'a Node, field: &str, go_type: &str) -> &'a [(Node, Node)] {
        match &node.value {
            Value::Map(entries) => entries,
            _ if node.tag() == "!!null" => &[],
            _ => {
                self.push(
                    node,
                    field,
                    format!("cannot unmarshal {} into {go_type}", node.tag()),
                );
                &[]
            }
        }
    }

    /// Keys of a map, with unknown ones refused (a typo must not pass silently).
    fn fields<'a>(
        &mut self,
        entries: &'a [(Node, Node)],
        prefix: &str,
        known: &[&str],
    ) -> Vec<(&'a str, &'a Node)> {
        let mut out = Vec::new();
        for (k, v) in entries {
            let Some(name) = k.scalar() else {
                self.push(k, prefix, "expected a field name");
                continue;
            };
            let field = format!("{prefix}{name}");
            if !known.contains(&name) {
                self.push(
                    k,
                    &field,
                    format!(
                        "unknown field (the reference proxy knows {})",
                        known
                            .iter()
                            .map(|k| format!("{prefix}{k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            }
            if out.iter().any(|(n, _)| *n == name) {
                self.push(k, &field, "mapping key already defined earlier");
                continue;
            }
            out.push((name, v));
        }
        out
    }
}

const TOP: &[&str] = &[
    "listen_addr",
    "log_level",
    "shutdown_timeout",
    "tunnel_domain",
    "tls",
    "routes",
    "upstream",
];

/// Reads the text of a reference config; all problems at once.
pub fn read(text: &str) -> Result<RefConfig, Vec<RefProblem>> {
    let root = match yaml::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Err(vec![RefProblem {
                line: 0,
                field: "(file)".into(),
                message: "empty: expected listen_addr, tls, routes, ...".into(),
            }]);
        }
        Err(e) => {
            return Err(vec![RefProblem {
                line: 0,
                field: "(syntax)".into(),
                message: format!("not valid YAML: {e}"),
            }]);
        }
    };
    let mut r = Reader {
        problems: Vec::new(),
    };
    let mut c = RefConfig::default();
    let entries = r.map(&root, "(file)", "config.Config");
    for (name, v) in r.fields(entries, "", TOP) {
        match name {
            "listen_addr" => c.listen_addr = r.string(v, name),
            "log_level" => {
                c.log_level = r.string(v, name);
                if let Some(l) = &c.log_level
                    && !["debug", "info", "warn", "error"].contains(&l.as_str())
                {
                    r.push(
                        v,
                        name,
                        format!("expected debug, info, warn or error, found {l:?}"),
                    );
                }
            }
            "shutdown_timeout" => c.shutdown_timeout = r.string(v, name),
            "tunnel_domain" => c.tunnel_domain = r.string(v, name),
            "tls" => {
                let tls = r.map(v, name, "config.TLSConfig");
                for (f, v) in r.fields(tls, "tls.", &["cert_file", "key_file"]) {
                    let field = format!("tls.{f}");
                    let value = r.string(v, &field);
                    match f {
                        "cert_file" => c.cert_file = value,
                        _ => c.key_file = value,
                    }
                }
            }
            "routes" => c.routes = routes(&mut r, v),
            "upstream" => upstream(&mut r, v, &mut c),
            _ => unreachable!("fields() keeps known names only"),
        }
    }
    if r.problems.is_empty() {
        Ok(c)
    } else {
        Err(r.problems)
    }
}

fn routes(r: &mut Reader, node: &Node) -> Vec<(String, String)> {
    let entries = match &node.value {
        Value::Map(entries) => entries,
        _ => {
            let hint = if matches!(node.value, Value::Seq(_)) {
                " (routes is a map, not a list: write `routes: { echo: http://host:port }`, one `name: scheme://host:port` per line)"
            } else {
                " (expected `name: scheme://host:port` entries)"
            };
            r.push(
                node,
                "routes",
                format!(
                    "cannot unmarshal {} into map[string]string{hint}",
                    node.tag()
                ),
            );
            return Vec::new();
        }
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in entries {
        let Some(key) = k.scalar() else {
            r.push(
                k,
                "routes",
                format!("cannot unmarshal {} into string (a route key)", k.tag()),
            );
            continue;
        };
        let field = format!("routes.{key}");
        if out.iter().any(|(n, _)| n == key) {
            r.push(k, &field, "mapping key already defined earlier");
            continue;
        }
        let Some(value) = v.scalar() else {
            r.push(
                v,
                &field,
                format!(
                    "cannot unmarshal {} into string: expected scheme://host:port",
                    v.tag()
                ),
            );
            continue;
        };
        if let Err(why) = Upstream::parse(value) {
            r.push(v, &field, why);
            continue;
        }
        out.push((key.to_string(), value.to_string()));
    }
    if entries.is_empty() {
        r.push(
            node,
            "routes",
            "empty: expected at least one `name: scheme://host:port`",
        );
    }
    out
}

fn upstream(r: &mut Reader, node: &Node, c: &mut RefConfig) {
    let entries = r.map(node, "upstream", "config.UpstreamConfig");
    for (f, v) in r.fields(
        entries,
        "upstream.",
        &["allowed_ips", "disable_ip_validation", "tls"],
    ) {
        match f {
            "allowed_ips" => match &v.value {
                Value::Seq(items) => {
                    let mut list = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        if let Some(s) = r.string(item, &format!("upstream.allowed_ips[{i}]")) {
                            list.push(s);
                        }
                    }
                    c.allowed_ips = Some(list);
                }
                _ => r.push(
                    v,
                    "upstream.allowed_ips",
                    format!(
                        "cannot unmarshal {} into []string (a list of CIDRs, one `- 10.0.0.0/8` per line)",
                        v.tag()
                    ),
                ),
            },
            "disable_ip_validation" => {
                c.disable_ip_validation = r.boolean(v, "upstream.disable_ip_validation")
            }
            _ => {
                let tls = r.map(v, "upstream.tls", "config.UpstreamTLSConfig");
                for (f, v) in r.fields(tls, "upstream.tls.", &["ca_file", "include_system_cas"]) {
                    let field = format!("upstream.tls.{f}");
                    match f {
                        "ca_file" => c.upstream_ca_file = r.string(v, &field),
                        _ => c.include_system_cas = r.boolean(v, &field),
                    }
                }
            }
        }
    }
    if c.allowed_ips.is_some() && c.disable_ip_validation == Some(true) {
        r.push(
            node,
            "upstream",
            "allowed_ips and disable_ip_validation are mutually exclusive",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quickstart's config (spec section 3), with the domain written in.
    const QUICKSTART: &str = "listen_addr: \":8080\"\ntunnel_domain: abcd1234.tunnel.anthropic.com\ntls:\n  cert_file: /data/tls.crt\n  key_file: /data/tls.key\nroutes:\n  echo: http://hello-mcp:9000\n";

    #[test]
    fn reads_the_documented_configs() {
        let c = read(QUICKSTART).unwrap();
        assert_eq!(c.listen_addr.as_deref(), Some(":8080"));
        assert_eq!(c.cert_file.as_deref(), Some("/data/tls.crt"));
        assert_eq!(
            c.routes,
            vec![("echo".into(), "http://hello-mcp:9000".into())]
        );
        let full = format!(
            "{QUICKSTART}log_level: info\nshutdown_timeout: 30s\nupstream:\n  allowed_ips:\n    - 10.0.0.0/8\n    - 127.0.0.0/8       # loopback, local testing only\n  tls:\n    include_system_cas: true\n"
        );
        let c = read(&full).unwrap();
        assert_eq!(c.shutdown_timeout.as_deref(), Some("30s"));
        assert_eq!(
            c.allowed_ips,
            Some(vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()])
        );
        assert_eq!(c.include_system_cas, Some(true));
    }

    fn problems(text: &str) -> Vec<String> {
        read(text)
            .unwrap_err()
            .into_iter()
            .map(|p| format!("line {}: {}: {}", p.line, p.field, p.message))
            .collect()
    }

    #[test]
    fn the_known_mistakes_get_the_reference_messages() {
        let list = QUICKSTART.replace(
            "  echo: http://hello-mcp:9000",
            "  - echo: http://hello-mcp:9000",
        );
        let p = problems(&list);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("line 7: routes: cannot unmarshal !!seq into map[string]string"),
            "{p:?}"
        );
        let p = problems(&QUICKSTART.replace("hello-mcp:9000", "hello-mcp:9000/mcp"));
        assert!(
            p[0].starts_with("line 7: routes.echo: invalid upstream (must be scheme://host:port)")
                && p[0].contains("has a path"),
            "{p:?}"
        );
        let p = problems(&QUICKSTART.replace("hello-mcp:9000", "hello-mcp"));
        assert!(
            p[0].contains("invalid upstream (must be scheme://host:port)")
                && p[0].contains("has no port"),
            "{p:?}"
        );
    }

    #[test]
    fn every_problem_at_once_with_its_line() {
        let text = "listen_addr: [1]\nlog_level: loud\ntls:\n  cert_file: /data/tls.crt\n  keyfile: /data/tls.key\nroutes: {}\nupstream:\n  allowed_ips: 10.0.0.0/8\n  disable_ip_validation: maybe\n";
        let p = problems(text);
        let want = [
            "line 1: listen_addr: cannot unmarshal !!seq into string",
            "line 2: log_level: expected debug, info, warn or error",
            "line 5: tls.keyfile: unknown field",
            "line 6: routes: empty",
            "line 8: upstream.allowed_ips: cannot unmarshal !!str into []string",
            "line 9: upstream.disable_ip_validation: cannot unmarshal !!str `maybe` into bool",
        ];
        assert_eq!(p.len(), want.len(), "{p:#?}");
        for (got, want) in p.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
        assert!(problems("- a\n- b\n")[0].contains("cannot unmarshal !!seq into config.Config"));
        assert!(problems(": : :\n  - [")[0].contains("not valid YAML"));
    }
}

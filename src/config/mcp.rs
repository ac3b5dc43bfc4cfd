//! `[mcp]`: the bounds of MCP inspection. Which routes are inspected, and their tool
//! policies, are route fields (`config::routes::RouteMcp`).

use serde::Deserialize;

use super::Validator;

/// Validated `[mcp]`; applied live on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpConfig {
    /// Largest request body, JSON response body and SSE event read. A bigger request on a
    /// route with a policy is refused (413); without a policy it is forwarded uninspected.
    pub max_inspect_bytes: usize,
    /// Tool names with a metric label of their own, per route; further names count as
    /// `other`, so that no caller can grow the metrics without bound.
    pub max_tool_labels: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            max_inspect_bytes: 1 << 20,
            max_tool_labels: 100,
        }
    }
}

const MIN_INSPECT: u64 = 4 << 10;
const MAX_INSPECT: u64 = 64 << 20;
const MAX_TOOL_LABELS: u64 = 10_000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMcp {
    max_inspect_bytes: Option<u64>,
    max_tool_labels: Option<u64>,
}

pub(super) fn validate(raw: RawMcp, v: &mut Validator) -> McpConfig {
    let d = McpConfig::default();
    let max_inspect_bytes = match raw.max_inspect_bytes {
        None => d.max_inspect_bytes,
        Some(n) if (MIN_INSPECT..=MAX_INSPECT).contains(&n) => n as usize,
        Some(n) => v.fail(
            "mcp.max_inspect_bytes",
            format!(
                "expected a size in bytes from {MIN_INSPECT} to {MAX_INSPECT} (default {}), found {n}",
                d.max_inspect_bytes
            ),
            d.max_inspect_bytes,
        ),
    };
    let max_tool_labels = match raw.max_tool_labels {
        None => d.max_tool_labels,
        Some(n) if (1..=MAX_TOOL_LABELS).contains(&n) => n as usize,
        Some(n) => v.fail(
            "mcp.max_tool_labels",
            format!(
                "expected a count from 1 to {MAX_TOOL_LABELS} (default {}), found {n}",
                d.max_tool_labels
            ),
            d.max_tool_labels,
        ),
    };
    McpConfig {
        max_inspect_bytes,
        max_tool_labels,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(extra: &str, routes: &str) -> Result<Config, String> {
        let text = format!(
            "tunnel_domain = \"t.example\"\n[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n{extra}\n[routes]\n{routes}\n"
        );
        Config::parse(Path::new("/etc/x.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn route_policy_fields() {
        let c = parse(
            "",
            "ro = { upstream = \"http://10.0.0.1:80\", tools_allow = [\"get_*\", \"list\"], tools_deny = [\"get_secret\"], methods_deny = [\"resources/*\"], log_argument_names = true }\nplain = \"http://10.0.0.2:80\"\n[routes.metered]\nupstream = \"http://10.0.0.3:80\"\ninspect = true\n",
        )
        .unwrap();
        let route = |n: &str| c.routes.iter().find(|r| r.name == n).unwrap().mcp.clone();
        let ro = route("ro");
        assert!(ro.inspect && ro.active() && ro.log_argument_names);
        let p = ro.policy.unwrap();
        assert!(p.allows_tool("get_file") && !p.allows_tool("get_secret") && !p.allows_tool("rm"));
        assert!(!p.allows_method("resources/read"));
        assert!(!route("plain").active());
        let m = route("metered");
        assert!(m.inspect && m.policy.is_none());
        assert_eq!(c.mcp, super::McpConfig::default());
    }

    #[test]
    fn invalid_fields_are_named() {
        let err = parse(
            "[mcp]\nmax_inspect_bytes = 10\nmax_tool_labels = 0",
            "a = { upstream = \"http://10.0.0.1:80\", tools_deny = \"rm\" }\nb = { upstream = \"http://10.0.0.1:80\", tools_allow = [\"ok\", \"\", 3] }\nc = { upstream = \"http://10.0.0.1:80\", tools_deny = [\"x\"], inspect = false }\nd = { upstream = \"http://10.0.0.1:80\", log_argument_names = true }\ne = { upstream = \"http://10.0.0.1:80\", inspect = \"yes\", tool_deny = [] }\n",
        )
        .unwrap_err();
        for want in [
            "mcp.max_inspect_bytes: expected a size in bytes from 4096",
            "mcp.max_tool_labels: expected a count from 1",
            "routes.a.tools_deny: expected a list of tool or method names",
            "routes.b.tools_allow[1]: an empty pattern",
            "routes.b.tools_allow[2]: expected a name or glob string, found integer",
            "routes.c.inspect: a route with tools_allow, tools_deny or methods_deny is always inspected",
            "routes.d.log_argument_names: argument names are logged by the audit log",
            "routes.e.inspect: expected true or false, found string",
            "routes.e.tool_deny: unknown field",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
    }
}

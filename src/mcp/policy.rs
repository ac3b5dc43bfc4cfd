//! Tool policy of a route: which tools Claude may see and call, and which methods it may
//! use at all. Pure decisions on the facts `jsonrpc` reads; the proxy applies them.

use super::jsonrpc::{Id, Kind, Message, Name, Parsed};

/// Longest tool name the policy judges; a longer one is refused (the MCP specification
/// advises names of 1 to 128 characters).
pub const MAX_TOOL_NAME: usize = 1024;

/// JSON-RPC error code of a refused call. The MCP specification answers an unknown tool with
/// -32602 (invalid params); a denied tool gets the same code, with a message saying why.
pub const DENIED_TOOL_CODE: i64 = -32602;
/// JSON-RPC error code of a refused method (method not found).
pub const DENIED_METHOD_CODE: i64 = -32601;
/// JSON-RPC error code of a body the proxy cannot read (parse error).
pub const PARSE_ERROR_CODE: i64 = -32700;
/// JSON-RPC error code of a message that is not valid JSON-RPC (invalid request).
pub const INVALID_REQUEST_CODE: i64 = -32600;
/// JSON-RPC error code of a message refused for another reason (internal error).
pub const REFUSED_CODE: i64 = -32603;

/// A tool or method name, or a simple glob: `*` matches any run of characters (`/`
/// included), `?` exactly one. Case-sensitive, as MCP names are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("an empty pattern matches nothing: remove it".into());
        }
        if s.chars().any(char::is_control) {
            return Err(format!("{s:?} contains a control character"));
        }
        Ok(Pattern(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Glob match in O(pattern x name) time, no recursion.
    pub fn matches(&self, name: &str) -> bool {
        let p: Vec<char> = self.0.chars().collect();
        let n: Vec<char> = name.chars().collect();
        let (mut pi, mut ni) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ni < n.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
                pi += 1;
                ni += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ni));
                pi += 1;
            } else if let Some((sp, sn)) = star {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// A route's policy. `tools_allow` (when set) lists the only tools allowed; `tools_deny`
/// takes tools away (it wins over `tools_allow`); `methods_deny` refuses whole methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub tools_allow: Option<Vec<Pattern>>,
    pub tools_deny: Vec<Pattern>,
    pub methods_deny: Vec<Pattern>,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Method(String),
    Tool(String),
    /// A `tools/call` whose `params.name` is missing, not a string, or too long.
    BadToolName,
    /// Not a JSON-RPC message the proxy can judge.
    Invalid,
    /// Allowed itself, but in a batch with a refused message.
    Batch,
}

impl Denial {
    /// Label of the reason (audit log, metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Method(_) => "method_denied",
            Denial::Tool(_) => "tool_denied",
            Denial::BadToolName => "bad_tool_name",
            Denial::Invalid => "invalid_message",
            Denial::Batch => "batch_refused",
        }
    }

    /// The JSON-RPC error the caller gets.
    pub fn error(&self) -> (i64, String) {
        match self {
            Denial::Method(m) => (
                DENIED_METHOD_CODE,
                format!(
                    "Method not allowed: {} is denied by the tunnel's policy for this server",
                    super::jsonrpc::bounded(m)
                ),
            ),
            Denial::Tool(t) => (
                DENIED_TOOL_CODE,
                format!(
                    "Tool not allowed: {} is denied by the tunnel's policy for this server",
                    super::jsonrpc::bounded(t)
                ),
            ),
            Denial::BadToolName => (
                DENIED_TOOL_CODE,
                "tools/call needs params.name as a string of at most 1024 characters".into(),
            ),
            Denial::Invalid => (
                INVALID_REQUEST_CODE,
                "Invalid request: not a JSON-RPC message the tunnel's policy can check".into(),
            ),
            Denial::Batch => (
                REFUSED_CODE,
                "Refused: this batch contains a message denied by the tunnel's policy; nothing in it was sent".into(),
            ),
        }
    }
}

/// The verdict on one body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward,
    /// Refused as a whole; one denial per message, in order.
    Refuse(Vec<Denial>),
}

impl Policy {
    pub fn allows_tool(&self, name: &str) -> bool {
        let allowed = match &self.tools_allow {
            Some(list) => list.iter().any(|p| p.matches(name)),
            None => true,
        };
        allowed && !self.tools_deny.iter().any(|p| p.matches(name))
    }

    pub fn allows_method(&self, method: &str) -> bool {
        !self.methods_deny.iter().any(|p| p.matches(method))
    }

    /// Judges one client message.
    pub fn check(&self, m: &Message) -> Result<(), Denial> {
        let Some(method) = m.method() else {
            return match m.kind() {
                // The client's answer to a server request (sampling, elicitation, roots).
                Kind::Response => Ok(()),
                _ => Err(Denial::Invalid),
            };
        };
        if m.kind() == Kind::Invalid {
            return Err(Denial::Invalid);
        }
        if !self.allows_method(method) {
            return Err(Denial::Method(method.to_owned()));
        }
        if method == "tools/call" {
            return match &m.params.name {
                Name::Str(t) if t.chars().count() <= MAX_TOOL_NAME => {
                    if self.allows_tool(t) {
                        Ok(())
                    } else {
                        Err(Denial::Tool(t.clone()))
                    }
                }
                _ => Err(Denial::BadToolName),
            };
        }
        Ok(())
    }

    /// Judges a whole body: forwarded only if every message in it is allowed.
    pub fn decide(&self, parsed: &Parsed) -> Decision {
        let verdicts: Vec<Result<(), Denial>> =
            parsed.messages.iter().map(|m| self.check(m)).collect();
        if verdicts.iter().all(Result::is_ok) {
            return Decision::Forward;
        }
        Decision::Refuse(
            verdicts
                .into_iter()
                .map(|v| v.err().unwrap_or(Denial::Batch))
                .collect(),
        )
    }

    /// Removes the tools this policy hides from every `tools/list` result in `body` (one
    /// message or a batch). `Ok(None)`: nothing to hide, pass the body on unchanged.
    /// `Ok(Some((bytes, hidden)))`: the rewritten body and how many tools were taken out.
    /// An entry without a string `name` is taken out too.
    pub fn filter_tools_list(
        &self,
        body: &[u8],
        parsed: &Parsed,
    ) -> Result<Option<(Vec<u8>, usize)>, String> {
        let hides = parsed.messages.iter().any(|m| {
            m.method.is_none()
                && m.result
                    .as_ref()
                    .and_then(|r| r.tools.as_ref())
                    .is_some_and(|tools| {
                        tools
                            .iter()
                            .any(|t| t.as_deref().is_none_or(|n| !self.allows_tool(n)))
                    })
        });
        if !hides {
            return Ok(None);
        }
        let mut value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let mut hidden = 0;
        let messages: Vec<&mut serde_json::Value> = match &mut value {
            serde_json::Value::Array(a) => a.iter_mut().collect(),
            v => vec![v],
        };
        for m in messages {
            if m.get("method").is_some() {
                continue;
            }
            let Some(tools) = m
                .get_mut("result")
                .and_then(|r| r.get_mut("tools"))
                .and_then(|t| t.as_array_mut())
            else {
                continue;
            };
            let before = tools.len();
            tools.retain(|t| {
                t.get("name")
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| self.allows_tool(n))
            });
            hidden += before - tools.len();
        }
        let bytes = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
        Ok(Some((bytes, hidden)))
    }
}

/// A JSON-RPC error response with `id`.
pub fn error_response(id: &Id, code: i64, message: &str) -> serde_json::Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.to_json(),
        "error": { "code": code, "message": message },
    })
}

/// The body the proxy answers a refused body with: one error per request (an id), as a
/// single object or, for a batch, an array; `None` when nothing in it expects an answer
/// (only notifications or responses).
pub fn refusal_body(parsed: &Parsed, denials: &[Denial]) -> Option<Vec<u8>> {
    let errors: Vec<serde_json::Value> = parsed
        .messages
        .iter()
        .zip(denials)
        .filter(|(m, _)| m.method.is_some() && m.id.is_some())
        .map(|(m, d)| {
            let (code, message) = d.error();
            error_response(m.id.as_ref().unwrap_or(&Id::Null), code, &message)
        })
        .collect();
    if errors.is_empty() {
        return None;
    }
    let value = if parsed.batch {
        serde_json::Value::Array(errors)
    } else {
        errors.into_iter().next().unwrap_or_default()
    };
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::super::jsonrpc::{Options, parse};
    use super::*;

    fn pats(list: &[&str]) -> Vec<Pattern> {
        list.iter().map(|s| Pattern::parse(s).unwrap()).collect()
    }

    #[test]
    fn globs() {
        let cases = [
            ("echo", "echo", true),
            ("echo", "echo2", false),
            ("echo", "Echo", false),
            ("delete_*", "delete_file", true),
            ("delete_*", "delete_", true),
            ("delete_*", "undelete_x", false),
            ("*admin*", "get-admin-token", true),
            ("resources/*", "resources/read", true),
            ("resources/*", "resources/templates/list", true),
            ("resources/*", "resources", false),
            ("t?st", "test", true),
            ("t?st", "tst", false),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("**x", "yx", true),
            ("é*", "ecole", false),
            ("é*", "éa", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(Pattern::parse(p).unwrap().matches(n), want, "{p} vs {n}");
        }
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("a\nb").is_err());
        // Worst case stays polynomial.
        let p = Pattern::parse(&("*a".repeat(30) + "b")).unwrap();
        assert!(!p.matches(&"a".repeat(10_000)));
    }

    #[test]
    fn allow_deny_and_methods() {
        let p = Policy {
            tools_allow: Some(pats(&["get_*", "list_*", "echo"])),
            tools_deny: pats(&["get_secret*"]),
            methods_deny: pats(&["resources/*"]),
        };
        assert!(p.allows_tool("get_file"));
        assert!(!p.allows_tool("get_secret_key"));
        assert!(!p.allows_tool("delete_file"));
        assert!(p.allows_method("tools/call"));
        assert!(!p.allows_method("resources/read"));
        let only_deny = Policy {
            tools_deny: pats(&["delete_*"]),
            ..Policy::default()
        };
        assert!(only_deny.allows_tool("anything"));
        assert!(!only_deny.allows_tool("delete_all"));
    }

    fn decide(p: &Policy, body: &str) -> Decision {
        p.decide(&parse(body.as_bytes(), Options::default()).unwrap())
    }

    #[test]
    fn decisions_on_bodies() {
        let p = Policy {
            tools_deny: pats(&["get-env"]),
            methods_deny: pats(&["resources/*"]),
            ..Policy::default()
        };
        let call = |t: &str| {
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{t}"}}}}"#)
        };
        assert_eq!(decide(&p, &call("echo")), Decision::Forward);
        assert_eq!(
            decide(&p, &call("get-env")),
            Decision::Refuse(vec![Denial::Tool("get-env".into())])
        );
        assert_eq!(
            decide(
                &p,
                r#"{"id":1,"method":"resources/read","params":{"uri":"x"}}"#
            ),
            Decision::Refuse(vec![Denial::Method("resources/read".into())])
        );
        assert_eq!(
            decide(
                &p,
                r#"{"id":1,"method":"tools/call","params":{"arguments":{}}}"#
            ),
            Decision::Refuse(vec![Denial::BadToolName])
        );
        assert_eq!(
            decide(&p, r#"{"id":1,"method":"tools/call","params":["get-env"]}"#),
            Decision::Refuse(vec![Denial::BadToolName])
        );
        let long = "x".repeat(MAX_TOOL_NAME + 1);
        assert_eq!(
            decide(&p, &call(&long)),
            Decision::Refuse(vec![Denial::BadToolName])
        );
        assert_eq!(
            decide(&p, r#"{"id":{},"method":"ping"}"#),
            Decision::Refuse(vec![Denial::Invalid])
        );
        // A mixed batch is refused as a whole.
        let batch = format!(
            "[{},{},{}]",
            call("echo"),
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{}}"#,
            call("get-env").replace("\"id\":1", "\"id\":2")
        );
        let Decision::Refuse(d) = decide(&p, &batch) else {
            panic!("mixed batch forwarded")
        };
        assert_eq!(
            d,
            [Denial::Batch, Denial::Batch, Denial::Tool("get-env".into())]
        );
        let parsed = parse(batch.as_bytes(), Options::default()).unwrap();
        let body: serde_json::Value =
            serde_json::from_slice(&refusal_body(&parsed, &d).unwrap()).unwrap();
        let arr = body.as_array().unwrap();
        assert_eq!(
            arr.len(),
            2,
            "one error per request, none for the notification"
        );
        assert_eq!(arr[0]["id"], 1);
        assert_eq!(arr[0]["error"]["code"], REFUSED_CODE);
        assert_eq!(arr[1]["id"], 2);
        assert_eq!(arr[1]["error"]["code"], DENIED_TOOL_CODE);
        // A client's response to a server request passes.
        assert_eq!(
            decide(&p, r#"{"jsonrpc":"2.0","id":3,"result":{}}"#),
            Decision::Forward
        );
    }

    #[test]
    fn tools_list_filtering() {
        let p = Policy {
            tools_deny: pats(&["get-env", "admin*"]),
            ..Policy::default()
        };
        let body = br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"echo","inputSchema":{"type":"object"}},{"name":"get-env"},{"name":"admin-reset"},{"title":"nameless"}],"nextCursor":"abc"}}"#;
        let parsed = parse(body, Options::default()).unwrap();
        let (out, hidden) = p.filter_tools_list(body, &parsed).unwrap().unwrap();
        assert_eq!(hidden, 3);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["result"]["tools"][0]["name"], "echo");
        assert_eq!(v["result"]["tools"][0]["inputSchema"]["type"], "object");
        assert_eq!(v["result"]["nextCursor"], "abc");
        assert_eq!(v["id"], 2);
        // Nothing to hide: the body is passed on as it is.
        let clean = br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"echo"}]}}"#;
        let parsed = parse(clean, Options::default()).unwrap();
        assert_eq!(p.filter_tools_list(clean, &parsed).unwrap(), None);
        // A request whose params carry "tools" is not touched.
        let req =
            br#"{"jsonrpc":"2.0","id":2,"method":"x","result":{"tools":[{"name":"get-env"}]}}"#;
        let parsed = parse(req, Options::default()).unwrap();
        assert_eq!(p.filter_tools_list(req, &parsed).unwrap(), None);
    }
}

//! Each route: the upstream's DNS answer, the allowlist verdict for every address (with the
//! rule that decided), the TCP connect time, and the MCP probe through the real inner path.

use std::time::{Duration, Instant};

use rustls::RootCertStore;

use super::certificate::CertContext;
use super::probe::{self, Answer, Failure, Target};
use super::service::Service;
use super::{Check, Env, Options};
use crate::config::ipset::Verdict as IpVerdict;
use crate::config::{Config, IpPolicy, Route};
use crate::lifecycle::Shutdown;
use crate::proxy::edge::WsTarget;
use crate::proxy::upstream::{self, ConnectError};
use crate::proxy::{Answer as ProxyAnswer, Proxy};

/// Where the probes go, and the in-process proxy to stop afterwards.
struct ProbeTarget {
    target: Target,
    via: String,
    in_process: Option<Shutdown>,
}

pub(super) async fn checks(
    config: &Config,
    cert: &CertContext,
    service: &Service,
    opts: &Options,
    env: &Env,
    out: &mut Vec<Check>,
) {
    if config.routes.is_empty() {
        out.push(Check::fail(
            "routes",
            "no route is configured: every request gets `502 No route configured for host`",
            "add one under [routes], e.g. echo = \"http://10.0.0.5:9000\"",
        ));
        return;
    }
    out.push(audit(config));
    let target = probe_target(config, cert, service, env, opts).await;
    let table = config.route_table();
    for (route, host) in config.routes.iter().zip(config.route_hosts()) {
        let reachable = upstream_checks(config, route, env, opts, out).await;
        let name = format!("route.{}.mcp", route.name);
        match (&target, reachable) {
            (_, false) => out.push(Check::skip(
                name,
                "not probed: the upstream cannot be reached (see above)",
            )),
            (Err(why), true) => out.push(Check::skip(name, format!("not probed: {why}"))),
            (Ok(t), true) => {
                out.push(mcp(config, &table, route, &host, t, opts).await);
            }
        }
    }
    if let Ok(ProbeTarget {
        in_process: Some(sd),
        ..
    }) = target
    {
        sd.drain(Duration::from_secs(1)).await;
    }
}

/// Which routes leave no audit trail: their MCP traffic is forwarded without being read
/// (no `inspect`, no policy). Said, not judged: a plain route is a valid choice.
fn audit(config: &Config) -> Check {
    let plain: Vec<&str> = config
        .routes
        .iter()
        .filter(|r| !r.mcp.active())
        .map(|r| r.name.as_str())
        .collect();
    let reason = if plain.is_empty() {
        format!(
            "every route ({}) is audited: one audit line per MCP message",
            config.routes.len()
        )
    } else {
        format!(
            "{} of {} routes not audited (MCP traffic forwarded without being read, no audit line): {}; `inspect = true` on a route audits it",
            plain.len(),
            config.routes.len(),
            plain.join(", ")
        )
    };
    Check::ok("routes.audit", reason).fact("not_audited", plain)
}

/// DNS, allowlist and connect; whether the upstream can be reached.
async fn upstream_checks(
    config: &Config,
    route: &Route,
    env: &Env,
    opts: &Options,
    out: &mut Vec<Check>,
) -> bool {
    let u = &route.upstream;
    let prefix = format!("route.{}", route.name);
    let literal = u.host.parse::<std::net::IpAddr>().is_ok();
    let lookup = tokio::time::timeout(
        opts.timeout,
        upstream::resolve(env.resolver.as_ref(), &u.host, u.port),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ConnectError::Timeout {
            host: u.host.clone(),
            after: opts.timeout,
        })
    });
    let addrs = match lookup {
        Ok(a) => a,
        Err(e) => {
            out.push(Check::fail(
                format!("{prefix}.dns"),
                format!("routes.{} upstream {}: {e}", route.name, u),
                format!(
                    "check the name (`getent hosts {}`) and the resolver in /etc/resolv.conf, or write the upstream's address in routes.{}",
                    u.host, route.name
                ),
            ));
            return false;
        }
    };
    let ips: Vec<std::net::IpAddr> = addrs.iter().map(|a| a.ip()).collect();
    let shown: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    out.push(
        Check::ok(
            format!("{prefix}.dns"),
            if literal {
                format!("{} is an address: no lookup", u.host)
            } else {
                format!("{} -> {}", u.host, shown.join(", "))
            },
        )
        .fact("addresses", shown),
    );
    let policy = &config.upstream.ip_policy;
    let verdicts: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| {
            let v = policy.verdict(*ip);
            serde_json::json!({ "ip": ip.to_canonical().to_string(), "allowed": v.is_allowed(), "rule": rule(policy, v) })
        })
        .collect();
    // The data path's own decision (a mixed answer fails closed), then the rule per address.
    match policy.check_all(&ips) {
        Err(bad) => {
            let v = policy.verdict(bad);
            let err = ConnectError::NotAllowed {
                host: u.host.clone(),
                ip: bad,
            };
            out.push(
                Check::fail(
                    format!("{prefix}.allowlist"),
                    format!(
                        "{err} ({}): the proxy answers 502 and never dials {}",
                        rule(policy, v),
                        u.host
                    ),
                    allow_fix(policy, v, bad),
                )
                .fact("verdicts", verdicts),
            );
            return false;
        }
        Ok(()) if *policy == IpPolicy::Disabled => out.push(
            Check::warn(
                format!("{prefix}.allowlist"),
                "upstream.disable_ip_validation = true: any address is dialled (no SSRF protection)",
                "list the upstreams' ranges in upstream.allowed_ips instead",
            )
            .fact("verdicts", verdicts),
        ),
        Ok(()) => {
            let why: Vec<String> = ips
                .iter()
                .map(|ip| format!("{} {}", ip.to_canonical(), rule(policy, policy.verdict(*ip))))
                .collect();
            out.push(
                Check::ok(
                    format!("{prefix}.allowlist"),
                    format!("allowed: {}", why.join("; ")),
                )
                .fact("verdicts", verdicts),
            );
        }
    }
    // The pool's own connector: resolve, check, dial a checked address, TLS for https.
    let plane = match crate::proxy::state::UpstreamPlane::new(&config.upstream, &env.resolver, 0) {
        Ok(p) => p,
        Err(e) => {
            out.push(Check::fail(
                format!("{prefix}.connect"),
                e.to_string(),
                "fix upstream.tls (see config.upstream_tls)",
            ));
            return false;
        }
    };
    let start = Instant::now();
    let uri = crate::proxy::upstream_uri(route, "/");
    match upstream::Connector::connect(plane.settings.clone(), uri).await {
        Ok(io) => {
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            let peer = io
                .peer_addr()
                .map_or_else(|_| u.authority(), |p| p.to_string());
            out.push(
                Check::ok(
                    format!("{prefix}.connect"),
                    format!(
                        "{} to {peer} in {ms:.2} ms",
                        if io.is_tls() {
                            "TCP + TLS"
                        } else {
                            "TCP connect"
                        }
                    ),
                )
                .fact("connect_ms", (ms * 1000.0).round() / 1000.0),
            );
            true
        }
        Err(e) => {
            let fix = match &e {
                ConnectError::Timeout { .. } => format!(
                    "nothing answers at {}: a firewall drops the connection, or the host is down (upstream.connect_timeout is {:?})",
                    u.authority(),
                    config.upstream.connect_timeout
                ),
                ConnectError::Tls { .. } => format!(
                    "the upstream's certificate must be valid for {} and signed by a CA in upstream.tls.ca_file (or the system store with include_system_cas = true)",
                    u.host
                ),
                _ => format!(
                    "start the MCP server on {}, or point routes.{} at the address and port it listens on",
                    u.authority(),
                    route.name
                ),
            };
            out.push(Check::fail(
                format!("{prefix}.connect"),
                format!("{e}: requests on this route get `502 Upstream connection failed`"),
                fix,
            ));
            false
        }
    }
}

/// The rule that decided, in words.
pub(super) fn rule(policy: &IpPolicy, v: IpVerdict) -> String {
    match v {
        IpVerdict::Allowed(net) => format!("inside {net}"),
        IpVerdict::Unchecked => "not checked (disable_ip_validation = true)".into(),
        IpVerdict::Outside => match policy {
            p if *p == IpPolicy::default() => {
                "outside the default allowlist (RFC 1918: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
                    .into()
            }
            IpPolicy::Allow(nets) => {
                let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
                format!("outside upstream.allowed_ips [{}]", list.join(", "))
            }
            IpPolicy::Disabled => "not checked".into(),
        },
        IpVerdict::NeverLegitimate(range) => format!(
            "in {range}, never a legitimate upstream (unspecified, broadcast, link-local with the cloud metadata address, multicast) unless an allowed_ips entry inside {range} names it"
        ),
    }
}

fn allow_fix(policy: &IpPolicy, v: IpVerdict, ip: std::net::IpAddr) -> String {
    let single = if ip.is_ipv4() {
        format!("{ip}/32")
    } else {
        format!("{ip}/128")
    };
    match v {
        IpVerdict::NeverLegitimate(range) => format!(
            "point the route at the upstream's private address; only if {ip} really is the upstream, add \"{single}\" (an entry inside {range}) to upstream.allowed_ips"
        ),
        _ => {
            let mut list: Vec<String> = match policy {
                IpPolicy::Allow(nets) => nets.iter().map(|n| format!("\"{n}\"")).collect(),
                IpPolicy::Disabled => Vec::new(),
            };
            list.push(format!("\"{single}\""));
            format!(
                "run the upstream on a private address (check with `dig +short`), or allow it deliberately: upstream.allowed_ips = [{}] (the list replaces the RFC 1918 default, so keep the entries you need)",
                list.join(", ")
            )
        }
    }
}

/// The running listener when it answers, else a proxy started here from the same config.
async fn probe_target(
    config: &Config,
    cert: &CertContext,
    service: &Service,
    env: &Env,
    opts: &Options,
) -> Result<ProbeTarget, String> {
    let Some(ca) = &cert.ca else {
        return Err("no CA certificate to trust for the inner TLS (see certificate.chain)".into());
    };
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.der.clone())
        .map_err(|e| format!("{} is not a usable trust anchor: {e}", ca.path.display()))?;
    let tls = crate::proxy::tls::client_config(roots, vec![b"http/1.1".to_vec()]);
    let running = service
        .listen_addr()
        .or_else(|| (config.listen_addr.port() != 0).then_some(config.listen_addr))
        .map(crate::cloudflared::spawn::origin_addr);
    if let Some(addr) = running
        && tokio::time::timeout(
            opts.timeout.min(Duration::from_secs(3)),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .is_ok_and(|c| c.is_ok())
    {
        let ws = WsTarget::parse(&format!("ws://{addr}")).map_err(|e| e.to_string())?;
        return Ok(ProbeTarget {
            target: Target { ws, tls },
            via: format!("the running listener ws://{addr}"),
            in_process: None,
        });
    }
    let Some(pair) = &cert.pair else {
        return Err(
            "the service's listener does not answer and the certificate pair does not load (see certificate.pair)"
                .into(),
        );
    };
    let proxy = Proxy::with_pair(config, pair.clone(), env.resolver.clone())
        .map_err(|e| format!("cannot start an in-process proxy: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot start an in-process proxy: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot start an in-process proxy: {e}"))?;
    let shutdown = Shutdown::new();
    tokio::spawn(proxy.serve(listener, shutdown.clone()));
    let ws = WsTarget::parse(&format!("ws://{addr}")).map_err(|e| e.to_string())?;
    Ok(ProbeTarget {
        target: Target { ws, tls },
        via: "an in-process proxy built from this config (the service's listener does not answer)"
            .into(),
        in_process: Some(shutdown),
    })
}

/// The route's MCP endpoint probed in both eras: `server/discover` (2026-07-28) first, then,
/// unless that answer shows a server of that revision, `initialize` as older revisions
/// open; what the answer means, and which revision the upstream speaks.
async fn mcp(
    config: &Config,
    table: &crate::config::RouteTable,
    route: &Route,
    host: &str,
    t: &ProbeTarget,
    opts: &Options,
) -> Check {
    let name = format!("route.{}.mcp", route.name);
    let url = format!("https://{host}{}", opts.mcp_path);
    // Whatever a server of an older revision answers to `server/discover` (an error, a 4xx,
    // nothing MCP at all) only means "ask the old way"; the `initialize` answer is diagnosed.
    if let Ok(req) = probe::discover(&opts.mcp_path)
        && let Ok(answer) = probe::send(&t.target, host, req, opts.timeout).await
        && let Some(c) = discovered(&name, &url, &answer)
    {
        return c
            .fact("via", t.via.as_str())
            .fact("status", answer.status)
            .fact("session_ms", ms(answer.session))
            .fact("latency_ms", ms(answer.latency));
    }
    let req = match probe::initialize(&opts.mcp_path) {
        Ok(r) => r,
        Err(e) => return Check::fail(name, e, "pass --path /<the server's MCP path>"),
    };
    let answer = match probe::send(&t.target, host, req, opts.timeout).await {
        Ok(a) => a,
        Err(f) => return failed_probe(config, route, &url, f, t).fact("via", t.via.as_str()),
    };
    let facts = |c: Check, a: &Answer| {
        c.fact("via", t.via.as_str())
            .fact("status", a.status)
            .fact("session_ms", ms(a.session))
            .fact("latency_ms", ms(a.latency))
    };
    if (200..300).contains(&answer.status) {
        if let Some(id) = answer.headers.get("mcp-session-id")
            && let Ok(req) = probe::delete_session(&opts.mcp_path, id)
        {
            let _ = probe::send(&t.target, host, req, opts.timeout).await;
        }
        return facts(initialized(&name, &url, &answer), &answer);
    }
    let sent_host = crate::proxy::upstream_host(route, host);
    let body = String::from_utf8_lossy(&answer.body);
    let own = ProxyAnswer::recognise(answer.status, &answer.body);
    let c = match answer.status {
        421 if own == Some(ProxyAnswer::Misdirected) => Check::fail(
            name,
            format!(
                "POST {url}: 421 from the proxy: the TLS server name and Host name different routes"
            ),
            "a route key shadows another: check [routes]",
        ),
        421 => Check::fail(
            name,
            format!(
                "POST {url}: 421 Misdirected Request from the upstream: it refused `Host: {sent_host}` (DNS-rebinding protection, as the MCP SDKs have when bound to loopback)"
            ),
            if route.preserve_host {
                format!(
                    "remove preserve_host = true from routes.{} so the proxy sends the upstream's own Host ({}), or add {host} to the server's allowed hosts",
                    route.name,
                    route.upstream.authority()
                )
            } else {
                format!(
                    "add {sent_host} to the MCP server's allowed hosts (its transport security / DNS-rebinding settings), or set preserve_host = true on routes.{} if it expects {host}",
                    route.name
                )
            },
        ),
        401 => oauth(table, &name, &url, &answer, t, opts).await,
        404 => Check::fail(
            name,
            format!(
                "POST {url}: 404 Not Found from the upstream: no MCP endpoint at {}",
                opts.mcp_path
            ),
            format!(
                "use the server's MCP path in the connector URL (https://{host}/<path>); find it in the server's docs and check it with `mcp-tunnel doctor --path /<path>`"
            ),
        ),
        502 if own == Some(ProxyAnswer::NoRoute) => Check::fail(
            name,
            format!(
                "POST {url}: {} (`{}`)",
                ProxyAnswer::NoRoute.describe(),
                ProxyAnswer::NoRoute.log_line()
            ),
            "the running service has other routes than this file: it applies a saved file by itself; see service.config for a refused reload",
        ),
        502 | 504 if own.is_some() => Check::fail(
            name,
            format!(
                "POST {url}: {} from the proxy: {}",
                answer.status,
                body.trim()
            ),
            "the running service's log (`journalctl -u mcp-tunnel`) has the dial error; its DNS answer or allowlist may differ from this file's",
        ),
        s @ (301..=308) => Check::warn(
            name,
            format!(
                "POST {url}: {s} redirect to {} (the proxy passes redirects on; MCP clients do not follow them for POST)",
                answer
                    .headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
            ),
            "use the URL the server redirects to in the connector (often a trailing slash or another path)",
        ),
        405 => Check::fail(
            name,
            format!(
                "POST {url}: 405 Method Not Allowed: the upstream takes no POST at {}",
                opts.mcp_path
            ),
            "the server may speak the older HTTP+SSE transport (GET /sse) or serve MCP on another path; use its streamable HTTP endpoint",
        ),
        s => Check::fail(
            name,
            format!(
                "POST {url}: {s} from the upstream: {}",
                body.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
            "see the MCP server's own log for why it refused `initialize`",
        ),
    };
    facts(c, &answer)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10000.0).round() / 10.0
}

/// The answer to `server/discover`, when it shows a server of 2026-07-28 or later: its result,
/// or an error only such a server sends (-32020 to -32022). `None`: not that revision.
fn discovered(name: &str, url: &str, a: &Answer) -> Option<Check> {
    let msg = probe::jsonrpc(a)?;
    if let Some(err) = msg.get("error") {
        let code = err["code"].as_i64()?;
        if !(-32022..=-32020).contains(&code) {
            return None;
        }
        let supported = &err["data"]["supported"];
        return Some(
            Check::fail(
                name.to_string(),
                format!(
                    "POST {url}: {} to `server/discover` (MCP {}): error {code}: {}{}",
                    a.status,
                    probe::MODERN_PROTOCOL_VERSION,
                    err["message"].as_str().unwrap_or(""),
                    if supported.is_array() {
                        format!("; the server supports {supported}")
                    } else {
                        String::new()
                    }
                ),
                "see the MCP server's log; the tunnel carried the request and its answer",
            )
            .fact("protocol_version", probe::MODERN_PROTOCOL_VERSION),
        );
    }
    let r = &msg["result"];
    let versions: Vec<&str> = r["supportedVersions"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    if !(200..300).contains(&a.status) || versions.is_empty() {
        return None;
    }
    let info = &r["_meta"]["io.modelcontextprotocol/serverInfo"];
    let server = info["name"].as_str().unwrap_or("?");
    let version = info["version"].as_str().unwrap_or("?");
    let protocol = if versions.contains(&probe::MODERN_PROTOCOL_VERSION) {
        probe::MODERN_PROTOCOL_VERSION
    } else {
        versions.iter().max().copied().unwrap_or("?")
    };
    Some(
        Check::ok(
            name.to_string(),
            format!(
                "POST {url}: {} in {:.1} ms, server {server} {version}, MCP protocol {protocol} (server/discover; supports {})",
                a.status,
                ms(a.latency),
                versions.join(", ")
            ),
        )
        .fact("server_name", server)
        .fact("server_version", version)
        .fact("protocol_version", protocol)
        .fact("supported_versions", versions.join(",")),
    )
}

/// A 2xx answer: an `initialize` result, or something that is not MCP.
fn initialized(name: &str, url: &str, a: &Answer) -> Check {
    let Some(msg) = probe::jsonrpc(a) else {
        let ctype = a
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content-type");
        return Check::fail(
            name,
            format!(
                "POST {url}: {} ({ctype}) but no JSON-RPC answer to `initialize`: not an MCP endpoint",
                a.status
            ),
            "point the connector URL at the server's MCP endpoint (streamable HTTP), e.g. /mcp",
        );
    };
    if let Some(err) = msg.get("error") {
        return Check::fail(
            name,
            format!("POST {url}: `initialize` returned a JSON-RPC error: {err}"),
            "see the MCP server's log; the tunnel carried the request and its answer",
        );
    }
    let r = &msg["result"];
    let server = r["serverInfo"]["name"].as_str().unwrap_or("?");
    let version = r["serverInfo"]["version"].as_str().unwrap_or("?");
    let protocol = r["protocolVersion"].as_str().unwrap_or("?");
    Check::ok(
        name,
        format!(
            "POST {url}: {} in {:.1} ms, server {server} {version}, MCP protocol {protocol}",
            a.status,
            ms(a.latency)
        ),
    )
    .fact("server_name", server)
    .fact("server_version", version)
    .fact("protocol_version", protocol)
}

/// A 401: an OAuth upstream. Claude's backend reads the resource metadata it announces
/// (`WWW-Authenticate: Bearer resource_metadata="..."`, RFC 9728); that URL must be reachable
/// through the tunnel, i.e. name a route under the tunnel domain.
async fn oauth(
    table: &crate::config::RouteTable,
    name: &str,
    url: &str,
    a: &Answer,
    t: &ProbeTarget,
    opts: &Options,
) -> Check {
    let challenge = a
        .headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok());
    let Some(challenge) = challenge else {
        return Check::fail(
            name,
            format!(
                "POST {url}: 401 without a WWW-Authenticate challenge: Claude cannot discover how to authorize"
            ),
            "make the server answer 401 with `WWW-Authenticate: Bearer resource_metadata=\"https://<route>.<tunnel domain>/.well-known/oauth-protected-resource\"` (MCP authorization)",
        );
    };
    let Some(meta) = probe::resource_metadata(challenge) else {
        return Check::warn(
            name,
            format!("POST {url}: 401 (OAuth), challenge `{challenge}` names no resource_metadata URL"),
            "announce it (`resource_metadata=\"https://<route>.<tunnel domain>/.well-known/oauth-protected-resource\"`): clients otherwise guess the well-known path",
        )
        .fact("www_authenticate", challenge);
    };
    let base = Check::ok(name, "")
        .fact("www_authenticate", challenge)
        .fact("resource_metadata", meta.as_str());
    let parsed: Option<http::Uri> = meta.parse().ok();
    let (meta_host, meta_path) = match &parsed {
        Some(u) => (
            u.host().unwrap_or("").to_string(),
            u.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        ),
        None => (String::new(), String::new()),
    };
    // The data path's lookup decides whether the URL's host is served through the tunnel.
    if meta_host.is_empty() || table.lookup(&meta_host).is_none() {
        return Check {
            verdict: super::Verdict::Fail,
            reason: format!(
                "POST {url}: 401 (OAuth); the resource metadata URL it announces, {meta}, is not a tunnel hostname: Claude's backend cannot fetch it through the tunnel"
            ),
            fix: Some(
                "configure the server's public base URL as https://<route>.<tunnel domain> so that it announces https://<route>.<tunnel domain>/.well-known/oauth-protected-resource (its authorization server may need a route too: reference \"OAuth behind a source-IP allowlist\")".into(),
            ),
            ..base
        };
    }
    let fetched = match probe::get(&meta_path) {
        Ok(req) => probe::send(&t.target, &meta_host, req, opts.timeout).await,
        Err(e) => Err(Failure::Http(e)),
    };
    match fetched {
        Ok(m) if (200..300).contains(&m.status) => {
            let json: Option<serde_json::Value> = serde_json::from_slice(&m.body).ok();
            let servers = json
                .as_ref()
                .and_then(|j| j.get("authorization_servers"))
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none listed".into());
            Check {
                reason: format!(
                    "POST {url}: 401 (OAuth upstream, as expected before sign-in); resource metadata {meta} is reachable through the tunnel ({}), authorization servers {servers}",
                    m.status
                ),
                ..base
            }
        }
        Ok(m) => Check {
            verdict: super::Verdict::Fail,
            reason: format!(
                "POST {url}: 401 (OAuth); its resource metadata {meta} answers {} through the tunnel",
                m.status
            ),
            fix: Some(format!(
                "serve the protected resource metadata at {meta_path} on {meta_host} (RFC 9728)"
            )),
            ..base
        },
        Err(f) => Check {
            verdict: super::Verdict::Fail,
            reason: format!(
                "POST {url}: 401 (OAuth); its resource metadata {meta} cannot be fetched through the tunnel: {f}"
            ),
            fix: Some(format!("make {meta_host} reachable through its route")),
            ..base
        },
    }
}

/// No HTTP answer: the session or the inner TLS failed (what the edge would see).
fn failed_probe(config: &Config, route: &Route, url: &str, f: Failure, t: &ProbeTarget) -> Check {
    let name = format!("route.{}.mcp", route.name);
    let tls = match &f {
        Failure::Tls(e) => e.to_ascii_lowercase().replace(' ', ""),
        _ => String::new(),
    };
    let fix = match &f {
        Failure::Tls(_) if tls.contains("unknownissuer") || tls.contains("badsignature") => {
            "the server certificate is not signed by the tunnel CA: the edge logs `tls handshake failed ... unknown certificate authority`; see certificate.chain".to_string()
        }
        Failure::Tls(_) if tls.contains("expired") || tls.contains("notvalidyet") => {
            "the server certificate is outside its validity (`bad certificate` at the edge); see certificate.validity".into()
        }
        Failure::Tls(_) if tls.contains("notvalidforname") => {
            "the server certificate does not cover this name (`bad certificate` at the edge); see certificate.names".into()
        }
        Failure::Tls(_) => "see the certificate checks above".into(),
        Failure::Listener(_) => format!(
            "the listener ({}) must accept WebSocket upgrades: is another program on listen_addr {}?",
            t.via, config.listen_addr
        ),
        Failure::Http(_) | Failure::Timeout(_) => format!(
            "the upstream {} accepted the connection but did not answer: see its log",
            route.upstream
        ),
    };
    Check::fail(name, format!("POST {url}: {f}"), fix)
}

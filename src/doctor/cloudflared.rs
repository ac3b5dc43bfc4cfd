//! cloudflared: the binary `run` would start, its version, that it accepts the argv `run`
//! passes, the token file, the running connector (from `/status`), and edge reachability.

use std::net::SocketAddr;

use super::service::Service;
use super::{Check, Env, Options, mode};
use crate::cloudflared::inspect::{self, Flags};
use crate::cloudflared::{spawn, token};
use crate::config::Config;

pub(super) async fn checks(
    config: &Config,
    service: &Service,
    opts: &Options,
    env: &Env,
    out: &mut Vec<Check>,
) {
    let cfg = &config.cloudflared;
    if !cfg.enabled {
        out.push(Check::skip(
            "cloudflared",
            format!(
                "[cloudflared] enabled = false: cloudflared runs as its own service; it must run `cloudflared tunnel run --url http://{}` (without a local target it logs `No ingress rules were defined` and callers get HTTP 500)",
                match service.listen_addr().or((config.listen_addr.port() != 0).then_some(config.listen_addr)) {
                    Some(a) => spawn::origin_addr(a).to_string(),
                    None => "<listener address>".into(),
                }
            ),
        ));
        return;
    }
    match spawn::resolve_binary(cfg.binary.as_deref(), env.path_var.as_ref()) {
        Err(e) => out.push(Check::fail(
            "cloudflared.binary",
            e.to_string(),
            "install cloudflared (the .deb/.rpm variant built with --cloudflared bundles it as /usr/lib/mcp-tunnel/cloudflared), set [cloudflared] binary to its path, or set enabled = false if cloudflared runs as its own service",
        )),
        Ok(binary) => {
            out.push(
                Check::ok("cloudflared.binary", format!("{}", binary.display()))
                    .fact("path", binary.display().to_string()),
            );
            out.push(match inspect::version(&binary, opts.timeout).await {
                Ok(line) => Check::ok("cloudflared.version", line.clone()).fact(
                    "version",
                    inspect::version_number(&line).unwrap_or(&line).to_string(),
                ),
                Err(e) => Check::fail(
                    "cloudflared.version",
                    e,
                    "replace the file with a working cloudflared binary for this machine",
                ),
            });
            let metrics = SocketAddr::from(([127, 0, 0, 1], cfg.metrics_port.unwrap_or(0)));
            let args = spawn::args(cfg, config.log_level.as_str(), metrics, config.listen_addr);
            let shown = format!("cloudflared {}", args.join(" "));
            out.push(match inspect::check_flags(&binary, &args, opts.timeout).await {
                Flags::Accepted => Check::ok(
                    "cloudflared.flags",
                    format!("accepts the argv `run` passes: {shown} (the --url gives it its local target)"),
                ),
                Flags::Refused(line) => Check::fail(
                    "cloudflared.flags",
                    format!("refuses the argv `run` passes ({shown}): {line}"),
                    "install a current cloudflared (the bundled package variant ships a tested one), or set [cloudflared] binary to one",
                ),
                Flags::Unknown(e) => Check::warn(
                    "cloudflared.flags",
                    format!("could not check the argv `run` passes: {e}"),
                    "run it by hand: `cloudflared <that argv> --help` must print the `tunnel run` help",
                ),
            }
            .fact("argv", args));
        }
    }
    out.push(token_check(config, env));
    out.push(connector(service));
    out.push(super::edge::check(cfg, opts.offline, opts.timeout).await);
}

fn token_check(config: &Config, env: &Env) -> Check {
    let path = token::token_path(
        config.cloudflared.token_file.as_deref(),
        env.credentials_dir.as_deref(),
    );
    let name = "cloudflared.token";
    match token::read(&path) {
        Err(token::TokenError::Read { source, .. }) => Check::fail(
            name,
            format!("{}: cannot read: {source}", path.display()),
            format!(
                "write the tunnel token (Console > Manage > MCP tunnels > your tunnel) to {} (mode 0600, owned by the service user), or use systemd `LoadCredential=tunnel-token:FILE`, or run `mcp-tunnel setup init`",
                path.display()
            ),
        ),
        Err(e @ token::TokenError::Invalid { .. }) => Check::fail(
            name,
            e.to_string(),
            "the file must hold the token exactly as the Console or `setup` gave it (one base64 line): copy it again",
        ),
        Ok(t) => match crate::certs::perms::check_secret(
            "cloudflared.token_file",
            &path,
            config.allow_readable_secrets,
        ) {
            Err(e) => Check::fail(
                name,
                format!(
                    "{} is readable by group or others (mode {:04o}): `run` refuses to start",
                    e.path, e.mode
                ),
                format!("chmod 600 {}", e.path),
            ),
            Ok(()) => Check::ok(
                name,
                format!(
                    "{} names tunnel {} (mode {:04o})",
                    path.display(),
                    t.tunnel_id(),
                    mode(&path).unwrap_or(0)
                ),
            )
            .fact("tunnel_id", t.tunnel_id()),
        },
    }
}

/// The running connector, as the service's `/status` reports it.
fn connector(service: &Service) -> Check {
    let name = "cloudflared.connector";
    let Some(status) = service.status() else {
        return Check::skip(name, "the service is not running here: no connector to ask");
    };
    let cf = &status["cloudflared"];
    let state = cf["state"].as_str().unwrap_or("?");
    let n = cf["connections"].as_u64().unwrap_or(0);
    let expected = cf["expected_connections"].as_u64().unwrap_or(4);
    let restarts = cf["restarts"].as_u64().unwrap_or(0);
    let id = cf["connector_id"].as_str().unwrap_or("unknown");
    let version = cf["version"]
        .as_str()
        .map(|l| inspect::version_number(l).unwrap_or(l))
        .unwrap_or("version unknown");
    let problem = cf["last_problem"]
        .as_str()
        .map(|p| format!("; last problem: {p}"))
        .unwrap_or_default();
    let summary = format!(
        "{state}: {n}/{expected} edge connections, connector {id}, cloudflared {version}, {restarts} restart{}{problem}",
        if restarts == 1 { "" } else { "s" }
    );
    let c = match state {
        "connected" => Check::ok(name, summary),
        "disabled" => Check::skip(name, "the running service does not supervise cloudflared"),
        "degraded" => Check::warn(
            name,
            summary,
            "healthy is four registered connections (four `Registered tunnel connection` lines): check egress TCP/UDP 7844 to the edge",
        ),
        "starting" => Check::warn(
            name,
            summary,
            "wait for the first `Registered tunnel connection`; if it never comes, check the token and egress TCP/UDP 7844 (`journalctl -u mcp-tunnel`, target cloudflared)",
        ),
        _ => Check::fail(
            name,
            summary,
            "read cloudflared's lines in `journalctl -u mcp-tunnel` (target cloudflared): a refused token means it was rotated or revoked (write the current one to the token file); no connection means egress TCP/UDP 7844 is blocked",
        ),
    };
    c.fact("connections", n)
        .fact("restarts", restarts)
        .fact("connector_id", id)
        .fact("version", version)
}

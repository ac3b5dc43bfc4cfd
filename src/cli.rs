//! Command-line definition (clap) and dispatch. Exit codes: 0 ok, 1 runtime failure,
//! 78 (EX_CONFIG) bad configuration, so systemd can refuse to restart on a config error.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

/// Exit status for configuration errors (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "mcp-tunnel",
    version,
    about = "Connects Claude to MCP servers in a private network: inner-TLS proxy and cloudflared supervisor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance (the proxy listener; cloudflared supervision when enabled).
    Run {
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a config file, including that the certificate and key load and match.
    Check {
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Carry local TCP connections (a TLS client's bytes) over WebSockets to the listener.
    Bridge {
        /// Where TLS clients connect, e.g. 127.0.0.1:8443.
        #[arg(long)]
        listen: SocketAddr,
        /// The proxy listener, e.g. ws://127.0.0.1:8080.
        #[arg(long)]
        to: String,
    },
    /// Run a self-contained demo: sample MCP server, proxy and bridge on loopback.
    Demo {
        /// Bridge port that the printed curl command uses.
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Keep certificates and config here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Programmatic provisioning through the Tunnels API (the reference `setup` component).
    Setup {
        #[command(subcommand)]
        command: SetupCommand,
    },
    /// Print a summary of a running appliance from its admin endpoint.
    Status {
        /// Admin endpoint address; default: `[admin] listen_addr` from the config file.
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check the whole chain (config, certificate, each route through the real inner path,
    /// cloudflared, the running service) and say for each problem what is wrong and the fix.
    /// Exit 0 when nothing fails, 1 otherwise.
    Doctor {
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
        /// Skip what leaves the machine: edge reachability (DNS SRV, TCP 7844), Tunnels API.
        #[arg(long)]
        offline: bool,
        /// Path the MCP probe sends `initialize` to.
        #[arg(long, default_value = "/mcp", value_parser = parse_mcp_path)]
        path: String,
        /// Bound on each network step.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show what the proxy would do with a request for URL: the route and why, the upstream
    /// request and Host, each resolved address and its allowlist verdict, the certificate.
    /// Exit 0 when it would be forwarded, 1 when refused.
    Explain {
        /// e.g. https://echo.<tunnel_domain>/mcp, or a bare hostname.
        url: String,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print the explanation as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the running cloudflared without a gap in service: the new connector starts
    /// beside the old one, which stops once the new one has registered (SIGUSR2 to the
    /// service; root or the service's user).
    RestartConnector {
        /// Admin endpoint address; default: `[admin] listen_addr` from the config file.
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Stop serving now, on this host, and stay stopped: writes a marker in the state
    /// directory (which `run` refuses to start past, exit 78), then tells the running service
    /// (SIGUSR1): cloudflared killed without a grace period, every session closed. Needs no
    /// API and no network. `--lift` removes the marker; the severed service then exits so
    /// that systemd starts it afresh.
    Sever {
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Admin endpoint address; default: `[admin] listen_addr` from the config file.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Why, recorded in the marker and shown by `status`, `/readyz` and the journal.
        #[arg(long)]
        reason: Option<String>,
        /// Remove the marker and let the service start again.
        #[arg(long)]
        lift: bool,
        /// How long to wait for the running service to confirm.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Review a window of the service's own records, before restoring after an incident:
    /// requests per route, callers, MCP methods and tools with their outcomes, refusals,
    /// and reloads, rotations, connector changes and sever in time order. Reads the journal
    /// (`journalctl -o json`) or, with --file, a JSON log (`log_format = "json"`).
    Audit {
        /// Start of the window: as journalctl takes it ("2026-12-07 03:00", "2h ago"); with
        /// --file, RFC 3339 or `YYYY-MM-DD HH:MM[:SS]` in UTC.
        #[arg(long, allow_hyphen_values = true)]
        since: String,
        /// End of the window (default: now).
        #[arg(long, allow_hyphen_values = true)]
        until: Option<String>,
        /// The systemd unit whose journal is read.
        #[arg(long, default_value = "mcp-tunnel")]
        unit: String,
        /// A file of JSON log lines instead of the journal.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the review as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take this host off the tunnel for good: stop the service (with --stop; refused while
    /// it runs otherwise), archive the tunnel (unless --keep-tunnel), then remove the state
    /// directory's secrets (CA key, server key, token, tunnel ID). Nothing is removed before
    /// the archive succeeded; prints what was removed and what was not.
    Teardown {
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Admin endpoint of the running service; default from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Stop the running service first (SIGTERM, a clean stop).
        #[arg(long)]
        stop: bool,
        /// Keep the tunnel: remove this host's secrets only (other hosts keep serving it).
        #[arg(long)]
        keep_tunnel: bool,
        /// Required: the secrets are deleted, and without --keep-tunnel the tunnel is archived
        /// (irreversible).
        #[arg(long)]
        yes: bool,
        /// Claude API base URL [env: API_URL]
        #[arg(long)]
        api_url: Option<String>,
        /// dir:PATH [default: provision.state_dir or /var/lib/mcp-tunnel]
        #[arg(long)]
        output: Option<String>,
    },
    /// Turn a reference Docker Compose deployment folder (config/mcp-proxy.yaml, data/, .env)
    /// into this appliance's config file and state directory, printing every decision; then
    /// check the result as `check` does.
    Import {
        /// The reference deployment folder (the one holding config/ and data/).
        #[arg(long)]
        from: PathBuf,
        /// Where to write the config file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config_out: PathBuf,
        /// Where to put the certificates, keys and token.
        #[arg(long, default_value = config::provision::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Replace files that differ (each old one is kept as NAME.before-import-<time>).
        #[arg(long)]
        force: bool,
        /// Owner of the state files [default: mcp-tunnel when it exists and this runs as root]
        #[arg(long)]
        owner: Option<String>,
    },
    /// Internal: the cloudflared launch trampoline (sets the parent-death signal, then execs).
    #[command(name = "__exec-child", hide = true)]
    ExecChild {
        #[arg(long)]
        parent: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<std::ffi::OsString>,
    },
    /// Certificate tools.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Write the man page and shell completions into DIR (used when building packages).
    #[command(hide = true)]
    GenerateAssets {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a new server certificate from the CA in DIR (no network), as the reference
    /// `setup renew-cert` does; a no-op while more than --renew-before remains.
    RenewCert {
        /// Holds ca.crt, ca.key, tls.crt, tls.key (and tunnel-domain, when provisioned).
        #[arg(long)]
        dir: PathBuf,
        /// Skip when the current certificate has more than this left ("0s": always renew).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        renew_before: std::time::Duration,
        #[arg(long, default_value = "2160h", value_parser = parse_duration)]
        cert_duration: std::time::Duration,
    },
}

/// `--path`: an absolute request path (query allowed), as a connector URL's path.
fn parse_mcp_path(s: &str) -> Result<String, String> {
    match s.parse::<http::uri::PathAndQuery>() {
        Ok(p) if s.starts_with('/') => Ok(p.to_string()),
        _ => Err(format!("expected a path such as /mcp, found {s:?}")),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::config::duration::parse(s)
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a tunnel CA and a server certificate for `*.DOMAIN` (ECDSA P-256).
    Init {
        #[arg(long)]
        tunnel_domain: String,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SetupCommand {
    /// Attach to (or create) a tunnel, make and register a CA, issue the server certificate,
    /// fetch the tunnel token, and write everything to the output directory. Idempotent.
    ///
    /// Credentials come from the environment (ANTHROPIC_FEDERATION_RULE_ID,
    /// ANTHROPIC_ORGANIZATION_ID, ANTHROPIC_WORKSPACE_ID, ANTHROPIC_SERVICE_ACCOUNT_ID and one of
    /// ANTHROPIC_IDENTITY_TOKEN_FILE / ANTHROPIC_IDENTITY_TOKEN; or API_TOKEN) or from the
    /// [provision] section of the config file.
    Init {
        /// Claude API base URL [env: API_URL]
        #[arg(long)]
        api_url: Option<String>,
        /// Tunnel to attach to (tnl_...); omitted: the stored one, else a new tunnel [env: TUNNEL_ID]
        #[arg(long)]
        tunnel_id: Option<String>,
        /// dir:PATH [default: provision.state_dir or /var/lib/mcp-tunnel]
        #[arg(long)]
        output: Option<String>,
        /// Server certificate validity
        #[arg(long, value_parser = config::duration::parse)]
        cert_duration: Option<std::time::Duration>,
        /// Change-detection string: a new value rotates the tunnel token
        #[arg(long)]
        token_version: Option<String>,
        /// Register a new CA although the tunnel already has an active one that the output
        /// directory does not hold (its key was lost). Without it, that is refused: the CA
        /// belongs to another host (see docs/PACKAGING.md, Scaling out)
        #[arg(long)]
        new_ca: bool,
        /// Config file whose [provision] section supplies defaults (read when it exists)
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Archive a tunnel, after severing this host (`mcp-tunnel sever`): irreversible, the
    /// domain is retired forever, the token invalidated and every CA certificate archived;
    /// the only step that severs every connector of the tunnel. Safe to repeat. With
    /// --reprovision, a fresh tunnel follows at once through the `setup init` path (new CA,
    /// certificate and token; the old state files are set aside in the state directory).
    Archive {
        /// The tunnel to archive (tnl_...).
        #[arg(long)]
        tunnel: String,
        /// Required: archiving cannot be undone.
        #[arg(long)]
        yes_archive_permanently: bool,
        /// Create a new tunnel right after, and print the URLs that must switch to it.
        #[arg(long)]
        reprovision: bool,
        /// Claude API base URL [env: API_URL]
        #[arg(long)]
        api_url: Option<String>,
        /// dir:PATH [default: provision.state_dir or /var/lib/mcp-tunnel]
        #[arg(long)]
        output: Option<String>,
        /// Admin endpoint of the running service (for the sever); default from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Rotate now, after a suspected leak, with no gap in service on this host: a new server
    /// key and certificate, a new tunnel token (cloudflared is replaced on it), and with --ca a
    /// new CA (the old one archived once certificates under the new one are served). No flag:
    /// --cert and --token. The running service carries the steps out (SIGHUP and a request
    /// file in the state directory); with none running, or a severed one, this command does.
    /// Safe to repeat: each run rotates again.
    Rotate {
        /// Required: rotations otherwise run on the [provision] schedule.
        #[arg(long)]
        now: bool,
        /// A new server key and certificate from the stored CA.
        #[arg(long)]
        cert: bool,
        /// A new tunnel token (`rotate_token`; the old one admits no new connector).
        #[arg(long)]
        token: bool,
        /// A new CA, the server certificate reissued under it, the old CA archived.
        #[arg(long)]
        ca: bool,
        /// Recorded with the token rotation by the API.
        #[arg(long, default_value = "mcp-tunnel setup rotate --now")]
        reason: String,
        /// Claude API base URL [env: API_URL] (used when no service runs)
        #[arg(long)]
        api_url: Option<String>,
        /// dir:PATH [default: provision.state_dir or /var/lib/mcp-tunnel]
        #[arg(long)]
        output: Option<String>,
        /// Admin endpoint of the running service; default from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Issue a new server certificate from the stored CA; no API calls.
    RenewCert {
        /// dir:PATH [default: provision.state_dir or /var/lib/mcp-tunnel]
        #[arg(long)]
        output: Option<String>,
        /// New certificate validity
        #[arg(long, value_parser = config::duration::parse, default_value = "2160h")]
        cert_duration: std::time::Duration,
        /// Skip while the current certificate has more than this left (0: always renew)
        #[arg(long, value_parser = parse_renew_before, default_value = "0")]
        renew_before: std::time::Duration,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

/// `setup archive`: refuse without the confirmation, sever this host, archive, and with
/// `reprovision` provision a fresh tunnel; each step says what it did.
fn setup_archive(
    tunnel: &str,
    confirmed: bool,
    reprovision: bool,
    flags: crate::provision::Overrides,
    admin: Option<SocketAddr>,
    config: &std::path::Path,
) -> u8 {
    use crate::provision::{ErrorClass, Settings};
    if !confirmed {
        eprintln!(
            "error: archiving tunnel {tunnel} cannot be undone (its domain is retired forever, its token invalidated, every CA certificate archived, every connector severed): pass --yes-archive-permanently"
        );
        return 2;
    }
    let section = match provision_section(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let env = |k: &str| std::env::var(k).ok();
    let settings = match Settings::resolve(&flags, &env, section.as_ref()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("note: {e}");
            None
        }
    };
    // This host first, API or not: nothing of it may keep serving the tunnel.
    let code = crate::incident::sever::main(&crate::incident::sever::Options {
        config: config.to_path_buf(),
        admin,
        reason: Some(format!("tunnel {tunnel} is being archived (setup archive)")),
        lift: false,
        timeout: std::time::Duration::from_secs(15),
    });
    if code == 2 {
        eprintln!("error: this host could not be severed: nothing was archived");
        return 2;
    }
    let Some(settings) = settings else {
        println!("{}", crate::incident::archive::console_steps(tunnel));
        return 1;
    };
    crate::telemetry::init("info");
    let Some(rt) = crate::telemetry::status::client_runtime() else {
        return 1;
    };
    match rt.block_on(crate::incident::archive::run(
        &settings,
        tunnel,
        reprovision,
    )) {
        Ok(a) => {
            if a.already {
                println!(
                    "tunnel {} ({}) was already archived at {}: nothing changed",
                    a.tunnel_id,
                    a.domain,
                    a.archived_at.as_deref().unwrap_or("?")
                );
            } else {
                println!(
                    "tunnel {} archived at {}: {} is retired forever, its token invalid, its CA certificates archived; every connector of it is severed",
                    a.tunnel_id,
                    a.archived_at.as_deref().unwrap_or("?"),
                    a.domain
                );
            }
            match a.fresh {
                Some((o, aside)) => {
                    println!(
                        "new tunnel {} ({}) provisioned in {} (new CA, certificate and token); the archived tunnel's files are in {}",
                        o.tunnel_id,
                        o.domain,
                        settings.output.display(),
                        aside.display()
                    );
                    if let Ok(c) = Config::load(config) {
                        println!("switch Managed Agent sessions and mcp_servers entries to:");
                        for r in &c.routes {
                            let host = if r.name.contains('.') {
                                r.name.clone()
                            } else {
                                format!("{}.{}", r.name, o.domain)
                            };
                            println!("  {}: https://{host}/mcp", r.name);
                        }
                    }
                    println!(
                        "then lift the sever (`mcp-tunnel sever --lift`): the service starts on the new tunnel. Other hosts of the old tunnel need the new state directory (docs/PACKAGING.md, Scaling out)."
                    );
                }
                None => println!(
                    "this host stays severed (`mcp-tunnel sever --lift` once it has a new tunnel: `mcp-tunnel setup init`, or rerun with --reprovision)"
                ),
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            if e.class() == ErrorClass::Config {
                EXIT_CONFIG
            } else {
                1
            }
        }
    }
}

/// `teardown`: stop, archive, remove; each step says what it did, and what is left for a
/// person is listed at the end.
fn teardown(
    config: &std::path::Path,
    admin: Option<SocketAddr>,
    stop: bool,
    keep_tunnel: bool,
    yes: bool,
    api_url: Option<String>,
    output: Option<String>,
) -> u8 {
    use crate::incident::teardown as td;
    use crate::provision::{Overrides, Settings};
    if !yes {
        eprintln!(
            "error: teardown deletes this host's tunnel secrets{}: pass --yes",
            if keep_tunnel {
                ""
            } else {
                " and archives the tunnel (irreversible)"
            }
        );
        return 2;
    }
    let addr = crate::telemetry::status::admin_addr(admin, config);
    if let Some(pid) = td::running_pid(addr) {
        if !stop {
            eprintln!(
                "error: the service is running (PID {pid}, admin endpoint {addr}): stop it first (`systemctl stop mcp-tunnel`), or pass --stop"
            );
            return 2;
        }
        if let Err(e) = td::stop(pid, std::time::Duration::from_secs(90)) {
            eprintln!("error: {e}");
            return 1;
        }
        println!("stopped the service (PID {pid})");
    }
    let section = match provision_section(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let env = |k: &str| std::env::var(k).ok();
    let flags = Overrides {
        api_url,
        output,
        ..Overrides::default()
    };
    let resolved = Settings::resolve(&flags, &env, section.as_ref());
    let dir = match &resolved {
        Ok(s) => s.output.clone(),
        Err(_) => crate::incident::sever::state_dir(
            Config::load(config).ok().as_ref(),
            std::env::var_os("STATE_DIRECTORY").as_deref(),
        ),
    };
    let tunnel = std::fs::read_to_string(dir.join(crate::provision::state::TUNNEL_ID))
        .ok()
        .map(|s| s.trim().to_string());
    let mut left = Vec::new();
    match (&tunnel, keep_tunnel, resolved) {
        (_, true, _) => left.push("the tunnel itself (--keep-tunnel): archive it in the Console or with `mcp-tunnel setup archive` when no host needs it".to_string()),
        (None, false, _) => left.push(format!("no tunnel ID in {}: if a tunnel exists, archive it in the Console", dir.display())),
        (Some(id), false, Ok(settings)) => {
            crate::telemetry::init("info");
            let Some(rt) = crate::telemetry::status::client_runtime() else {
                return 1;
            };
            match rt.block_on(td::archive(&settings, id)) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("error: {e}
nothing was removed: the state directory is as it was");
                    return 1;
                }
            }
        }
        (Some(id), false, Err(e)) => {
            eprintln!(
                "error: cannot archive tunnel {id}: {e}
nothing was removed. Archive it in the Console (Tunnels -> {id} -> Archive) and rerun with --keep-tunnel"
            );
            return 1;
        }
    }
    match td::remove_secrets(&dir) {
        Ok((removed, kept)) => {
            if removed.is_empty() {
                println!("nothing left to remove in {}", dir.display());
            } else {
                println!("removed from {}: {}", dir.display(), removed.join(", "));
            }
            for k in kept {
                left.push(format!("{} (an archived tunnel's files, kept by `setup archive --reprovision`): remove it when no longer needed", k.display()));
            }
        }
        Err(e) => {
            eprintln!("error: removing the secrets from {}: {e}", dir.display());
            return 1;
        }
    }
    left.push(format!(
        "the config file {} (it holds no secret)",
        config.display()
    ));
    left.push("copies of the state directory on other hosts, and any backups of it".into());
    left.push("the package itself: `apt purge mcp-tunnel` or `dnf remove mcp-tunnel`".into());
    println!("not removed:");
    for l in left {
        println!("  - {l}");
    }
    0
}

/// `--renew-before` takes a duration, or the reference's bare `0`.
fn parse_renew_before(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    config::duration::parse(s)
}

/// The `[provision]` section of `path` when the file exists; a broken file is an error.
fn provision_section(path: &std::path::Path) -> Result<Option<config::ProvisionConfig>, u8> {
    if !path.exists() {
        return Ok(None);
    }
    match Config::load(path) {
        Ok(c) => Ok(c.provision),
        Err(e) => Err(fail_config(&e)),
    }
}

fn setup(command: SetupCommand) -> u8 {
    use crate::provision::{self, ErrorClass, Overrides, Settings};
    match command {
        SetupCommand::Init {
            api_url,
            tunnel_id,
            output,
            cert_duration,
            token_version,
            new_ca,
            config,
        } => {
            let section = match provision_section(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let flags = Overrides {
                api_url,
                tunnel_id,
                output,
                cert_duration,
                token_version,
                new_ca,
            };
            let env = |k: &str| std::env::var(k).ok();
            let settings = match Settings::resolve(&flags, &env, section.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_CONFIG;
                }
            };
            crate::telemetry::init("info");
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
            match rt.block_on(provision::ensure(&settings)) {
                Ok(o) => {
                    println!(
                        "tunnel {} ({}) provisioned in {}: {}",
                        o.tunnel_id,
                        o.domain,
                        settings.output.display(),
                        if o.changed.is_empty() {
                            "nothing changed".to_string()
                        } else {
                            format!("wrote {}", o.changed.join(", "))
                        }
                    );
                    if o.rotated_token {
                        println!(
                            "the tunnel token was rotated: restart cloudflared (systemctl restart mcp-tunnel)"
                        );
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    if e.class() == ErrorClass::Config {
                        EXIT_CONFIG
                    } else {
                        1
                    }
                }
            }
        }
        SetupCommand::Archive {
            tunnel,
            yes_archive_permanently,
            reprovision,
            api_url,
            output,
            admin,
            config,
        } => setup_archive(
            &tunnel,
            yes_archive_permanently,
            reprovision,
            Overrides {
                api_url,
                tunnel_id: Some(tunnel.clone()),
                output,
                ..Overrides::default()
            },
            admin,
            &config,
        ),
        SetupCommand::Rotate {
            now,
            cert,
            token,
            ca,
            reason,
            api_url,
            output,
            admin,
            config,
        } => {
            if !now {
                eprintln!(
                    "error: pass --now: without it rotations run on the [provision] schedule (ca_renew_before, rotate_token_every, certs.renew_before)"
                );
                return 2;
            }
            let section = match provision_section(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            crate::incident::rotate::main(&crate::incident::rotate::Options {
                config,
                section,
                admin,
                what: crate::incident::rotate::What::from_flags(cert, token, ca),
                reason,
                overrides: Overrides {
                    api_url,
                    output,
                    ..Overrides::default()
                },
            })
        }
        SetupCommand::RenewCert {
            output,
            cert_duration,
            renew_before,
            config,
        } => {
            let section = match provision_section(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let dir = match output {
                Some(o) => match provision::parse_output(&o) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return EXIT_CONFIG;
                    }
                },
                None => section.map_or_else(
                    || PathBuf::from(config::provision::DEFAULT_STATE_DIR),
                    |s| s.state_dir,
                ),
            };
            renew_cert(&dir, cert_duration, renew_before)
        }
    }
}

/// Runs a parsed command line; returns the process exit code.
pub fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            let _log = crate::telemetry::init_with(config.log_level.as_str(), config.log_format);
            let rt = match new_runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(crate::supervisor::run(config)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e}");
                    tracing::error!("{e}");
                    e.exit_code()
                }
            }
        }
        Command::Status { admin, config } => crate::telemetry::status::print(admin, &config),
        Command::Doctor {
            config,
            json,
            offline,
            path,
            timeout,
        } => {
            let opts = crate::doctor::Options {
                config,
                offline,
                mcp_path: path,
                timeout,
            };
            crate::doctor::main(&opts, json)
        }
        Command::Explain { url, config, json } => crate::doctor::explain::main(&config, &url, json),
        Command::RestartConnector {
            admin,
            config,
            timeout,
        } => crate::telemetry::restart_connector::run(admin, &config, timeout),
        Command::Audit {
            since,
            until,
            unit,
            file,
            json,
        } => crate::incident::audit::main(&crate::incident::audit::Options {
            since,
            until,
            unit,
            file,
            json,
        }),
        Command::Teardown {
            config,
            admin,
            stop,
            keep_tunnel,
            yes,
            api_url,
            output,
        } => teardown(&config, admin, stop, keep_tunnel, yes, api_url, output),
        Command::Sever {
            config,
            admin,
            reason,
            lift,
            timeout,
        } => crate::incident::sever::main(&crate::incident::sever::Options {
            config,
            admin,
            reason,
            lift,
            timeout,
        }),
        Command::ExecChild { parent, argv } => crate::cloudflared::spawn::exec_child(parent, &argv),
        Command::Bridge { listen, to } => {
            crate::telemetry::init("info");
            let target = match crate::proxy::edge::WsTarget::parse(&to) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("--to: {e}");
                    return 2;
                }
            };
            runtime(async move {
                let listener = crate::proxy::bridge::bind(listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
                let shutdown = crate::lifecycle::Shutdown::new();
                tokio::spawn(crate::proxy::bridge::serve(
                    listener,
                    target,
                    shutdown.clone(),
                ));
                crate::lifecycle::termination_signal().await?;
                shutdown.drain(std::time::Duration::from_secs(5)).await;
                Ok(())
            })
        }
        Command::Setup { command } => setup(command),
        Command::Import {
            from,
            config_out,
            state_dir,
            force,
            owner,
        } => import(crate::import::Options {
            from,
            config_out,
            state_dir,
            force,
            owner,
        }),
        Command::GenerateAssets { out } => match crate::assets::generate(&out) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {}: {e}", out.display());
                1
            }
        },
        Command::Demo { port, dir } => {
            crate::telemetry::init("warn");
            runtime(crate::demo::run(port, dir))
        }
        Command::Certs {
            command: CertsCommand::Init { tunnel_domain, dir },
        } => certs_init(&tunnel_domain, &dir),
        Command::RenewCert {
            dir,
            renew_before,
            cert_duration,
        } => renew_cert(&dir, cert_duration, renew_before),
    }
}

fn import(opts: crate::import::Options) -> u8 {
    let mut out = std::io::stdout();
    match crate::import::run(&opts, &mut out) {
        Ok(config) => {
            println!("Checking {} as `mcp-tunnel check` does:", config.display());
            let code = check(&config);
            if code == 0 {
                println!(
                    "Next: systemctl restart mcp-tunnel (or enable --now). The Compose stack may keep running meanwhile: both are connectors of the same tunnel; stop it with `docker compose down` once this one serves."
                );
            }
            code
        }
        Err(e) => {
            eprintln!("{e}");
            if matches!(e, crate::import::ImportError::Io(_)) {
                eprintln!("the import stopped there: the files listed above as written stay");
            } else {
                eprintln!("nothing was written");
            }
            e.exit_code()
        }
    }
}

fn certs_init(domain: &str, dir: &std::path::Path) -> u8 {
    use crate::certs::issue;
    let issued = issue::generate(domain, issue::CA_VALIDITY, issue::SERVER_VALIDITY)
        .and_then(|pki| pki.write_to_with_domain(dir, domain));
    if let Err(e) = issued {
        eprintln!("error: {e}");
        return 1;
    }
    let d = dir.display();
    println!("Wrote in {d}:");
    println!("  ca.crt   tunnel CA certificate (ECDSA P-256, 5 years)   <- upload this one");
    println!("  ca.key   tunnel CA private key (0600): keep it here for renewal, or offline");
    println!("  tls.crt  server certificate for {domain} and *.{domain} (90 days)");
    println!("  tls.key  server private key (0600)");
    println!();
    println!("Next: Console > Manage > MCP tunnels > your tunnel > Add certificate, and upload");
    println!("  {d}/ca.crt");
    println!("Then set [tls] cert_file/key_file to {d}/tls.crt and {d}/tls.key, and, so that");
    println!("the service renews the server certificate itself, [certs] ca_cert_file/ca_key_file.");
    0
}

/// `renew-cert` and `setup renew-cert`: the reference semantics (no network; a no-op while
/// more than `renew_before` remains; `0` always renews).
fn renew_cert(
    dir: &std::path::Path,
    cert_duration: std::time::Duration,
    renew_before: std::time::Duration,
) -> u8 {
    match crate::provision::renew_cert(dir, cert_duration, renew_before) {
        Ok(true) => {
            println!("issued a new server certificate in {}", dir.display());
            0
        }
        Ok(false) => {
            println!(
                "{}: the server certificate has more than {} left; nothing to do",
                dir.display(),
                humantime::format_duration(renew_before)
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn check(path: &std::path::Path) -> u8 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail_config(&e),
    };
    let mut failed = false;
    let now = crate::supervisor::reload::unix_now();
    match crate::supervisor::reload::load_checked(&config, now) {
        Ok((_, facts)) => println!(
            "server certificate: serial {}, SAN {:?}, expires in {} days",
            facts.serial,
            facts.dns_names,
            (facts.not_after - now).div_euclid(86400)
        ),
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            failed = true;
        }
    }
    if let Err(e) = crate::proxy::tls::upstream_client_config(&config.upstream) {
        eprintln!("{}: {e}", path.display());
        failed = true;
    }
    // Under systemd this runs as ExecStartPre, in the unit's sandbox: the same test `run` makes.
    match config.peer_check {
        config::PeerCheck::On { allow_root } => {
            match crate::proxy::peer::PeerGate::new(allow_root, config.listen_addr.ip()) {
                Ok(gate) => println!(
                    "peer check: on, the listener serves {} (the kernel names each peer's owner here)",
                    gate.who()
                ),
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    failed = true;
                }
            }
        }
        config::PeerCheck::Off(why) => println!("peer check: off ({})", why.reason()),
    }
    if config.cloudflared.enabled {
        let c = &config.cloudflared;
        if let Err(e) = crate::cloudflared::spawn::resolve_binary(
            c.binary.as_deref(),
            std::env::var_os("PATH").as_ref(),
        ) {
            eprintln!("{}: {e}", path.display());
            failed = true;
        }
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let token =
            crate::cloudflared::token::token_path(c.token_file.as_deref(), creds.as_deref());
        if let Err(e) = crate::cloudflared::token::read(&token) {
            eprintln!("{}: {e}", path.display());
            failed = true;
        } else if let Err(e) = crate::certs::perms::check_secret(
            "cloudflared.token_file",
            &token,
            config.allow_readable_secrets,
        ) {
            eprintln!("{}: {e}", path.display());
            failed = true;
        }
    }
    if failed {
        return EXIT_CONFIG;
    }
    println!(
        "{}: ok ({} route{}, listen_addr {})",
        path.display(),
        config.routes.len(),
        if config.routes.len() == 1 { "" } else { "s" },
        config.listen_addr
    );
    0
}

fn fail_config(e: &config::ConfigError) -> u8 {
    eprintln!("{e}");
    EXIT_CONFIG
}

/// The multi-threaded runtime every long-running command uses; `Err` is the exit code.
fn new_runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            1
        })
}

fn runtime<F: std::future::Future<Output = anyhow::Result<()>>>(fut: F) -> u8 {
    let rt = match new_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(fut) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            tracing::error!("{e:#}");
            1
        }
    }
}

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
    /// Print a summary of a running appliance from its admin endpoint.
    Status {
        /// Admin endpoint address; default: `[admin] listen_addr` from the config file.
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long, short, env = "MCP_TUNNEL_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
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

/// Runs a parsed command line; returns the process exit code.
pub fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail_config(&e),
            };
            crate::telemetry::init(config.log_level.as_str());
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return 1;
                }
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
        } => {
            let issued = crate::certs::issue::generate(
                &tunnel_domain,
                crate::certs::issue::CA_VALIDITY,
                crate::certs::issue::SERVER_VALIDITY,
            )
            .and_then(|pki| pki.write_to(&dir));
            match issued {
                Ok(()) => {
                    println!(
                        "wrote ca.crt, ca.key, tls.crt, tls.key for *.{tunnel_domain} in {}",
                        dir.display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> u8 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail_config(&e),
    };
    let mut failed = false;
    if let Err(e) = crate::certs::load_server_pair(&config.tls) {
        eprintln!("{}: {e}", path.display());
        failed = true;
    }
    if let Err(e) = crate::proxy::tls::upstream_client_config(&config.upstream) {
        eprintln!("{}: {e}", path.display());
        failed = true;
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

fn runtime<F: std::future::Future<Output = anyhow::Result<()>>>(fut: F) -> u8 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
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

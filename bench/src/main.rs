//! `mcp-tunnel-bench`: the benchmark upstream, the load generator and the helpers that
//! `bench/run.sh` drives (reload/rotation churn, time to READY, the BENCHMARKS.md report).
//! Not part of the appliance binary.

#![forbid(unsafe_code)]

mod load;
mod ops;
mod report;
mod upstream;
mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mcp-tunnel-bench",
    about = "Benchmark tools for mcp-tunnel (bench/run.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fast upstream: JSON-RPC tools/call echo (JSON and SSE-framed) and timed SSE events.
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Load generator: prints one JSON line of results per measurement.
    Load(load::LoadArgs),
    /// Rewrites the proxy's config every `reload_every` and rotates its server certificate
    /// every `rotate_every`, for `duration`; prints what it did and what the log shows.
    Churn(ops::ChurnArgs),
    /// Starts a command repeatedly and times READY=1 (sd-notify) and the listening port.
    Ready(ops::ReadyArgs),
    /// Times the peer check's NETLINK_SOCK_DIAG lookup alone.
    PeerLookup(ops::PeerLookupArgs),
    /// Renders BENCHMARKS.md from the collected JSON lines.
    Report(report::ReportArgs),
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    mcp_tunnel::config::duration::parse(s)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Report(args) = cli.command {
        return exit(report::run(args));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    exit(rt.block_on(async move {
        match cli.command {
            Command::Upstream { listen } => upstream::serve(listen).await,
            Command::Load(args) => load::run(args).await,
            Command::Churn(args) => ops::churn(args).await,
            Command::Ready(args) => ops::ready(args).await,
            Command::PeerLookup(args) => ops::peer_lookup(args).await,
            Command::Report(_) => unreachable!("handled above"),
        }
    }))
}

fn exit(r: anyhow::Result<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

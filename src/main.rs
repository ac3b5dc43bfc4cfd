use clap::Parser;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(mcp_tunnel::cli::dispatch(mcp_tunnel::cli::Cli::parse()))
}

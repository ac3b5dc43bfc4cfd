//! Files generated from the clap definition for the packages: the man page and shell
//! completions (`mcp-tunnel generate-assets --out DIR`, a hidden subcommand that
//! `packaging/build-packages.sh` runs on the freshly built binary).

use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `DIR/man/mcp-tunnel.1` plus one page per visible subcommand
/// (`mcp-tunnel-run.1`, ...), and `DIR/completions/{mcp-tunnel.bash,_mcp-tunnel,mcp-tunnel.fish}`.
pub fn generate(dir: &Path) -> io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;

    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;

    for (shell, file) in [
        (Shell::Bash, "mcp-tunnel.bash"),
        (Shell::Zsh, "_mcp-tunnel"),
        (Shell::Fish, "mcp-tunnel.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "mcp-tunnel", &mut out);
        std::fs::write(completions.join(file), out)?;
    }
    Ok(())
}

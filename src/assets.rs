//! Files generated from the clap definition for the packages: the man page and shell
//! completions (`mcp-tunnel generate-assets --out DIR`, a hidden subcommand that
//! `packaging/build-packages.sh` runs on the freshly built binary).

use std::io;
use std::path::Path;

use clap::{Command, CommandFactory};
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

    let mut visible = visible_only(&cmd);
    for (shell, file) in [
        (Shell::Bash, "mcp-tunnel.bash"),
        (Shell::Zsh, "_mcp-tunnel"),
        (Shell::Fish, "mcp-tunnel.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut visible, "mcp-tunnel", &mut out);
        std::fs::write(completions.join(file), out)?;
    }
    Ok(())
}

/// The command without its hidden subcommands (internal plumbing such as this one):
/// clap_mangen skips them by itself, clap_complete's generators do not.
fn visible_only(cmd: &Command) -> Command {
    let mut out = Command::new("mcp-tunnel")
        .version(env!("CARGO_PKG_VERSION"))
        .about(cmd.get_about().cloned().unwrap_or_default());
    for arg in cmd.get_arguments() {
        out = out.arg(arg.clone());
    }
    out.subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_pages_and_completions_without_hidden_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        super::generate(dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/mcp-tunnel.1")).unwrap();
        assert!(page.contains("mcp\\-tunnel\\-run(1)"), "{page}");
        assert!(dir.path().join("man/mcp-tunnel-check.1").exists());
        let doctor = std::fs::read_to_string(dir.path().join("man/mcp-tunnel-doctor.1")).unwrap();
        assert!(doctor.contains("\\-\\-offline"), "{doctor}");
        assert!(dir.path().join("man/mcp-tunnel-explain.1").exists());
        for file in ["mcp-tunnel.bash", "_mcp-tunnel", "mcp-tunnel.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            for command in ["check", "doctor", "explain", "offline"] {
                assert!(text.contains(command), "{file} lacks {command}");
            }
            for hidden in ["generate-assets", "__exec-child"] {
                assert!(!text.contains(hidden), "{file} offers {hidden}");
            }
        }
    }
}

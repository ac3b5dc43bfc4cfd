//! Asking the cloudflared binary about itself without starting a tunnel: its version
//! (`--version`), and whether it accepts the exact argv `run` passes (that argv with `--help`
//! appended: cloudflared parses every flag, then prints the `run` help instead of running).
//! Neither dials anything, and the environment holds nothing but `PATH`.
//!
//! cloudflared answers an unknown or misplaced flag with `Incorrect Usage ...` on stdout and
//! exit status 0, so the verdict comes from the text, not the status.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::spawn::inspect_env;

/// What one inspection run printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `binary args` with a cleared environment; `Err` when it cannot start or does not
/// finish within `timeout` (it is killed then).
pub async fn run(binary: &Path, args: &[String], timeout: Duration) -> Result<Output, String> {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env_clear()
        .envs(inspect_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", binary.display())),
        Err(_) => Err(format!(
            "{} did not finish within {timeout:?}",
            binary.display()
        )),
    }
}

/// `cloudflared --version`: the line it prints (`cloudflared version 2026.8.2 (built ...)`).
pub async fn version(binary: &Path, timeout: Duration) -> Result<String, String> {
    let out = run(binary, &["--version".to_string()], timeout).await?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("cloudflared version"))
        .map(|l| l.trim().to_string());
    match (out.code, line) {
        (Some(0), Some(line)) => Ok(line),
        (code, _) => Err(format!(
            "`{} --version` printed no version (exit {}): {}",
            binary.display(),
            code.map_or("by signal".to_string(), |c| c.to_string()),
            first_line(&out)
        )),
    }
}

/// The number in a `cloudflared version X (built ...)` line.
pub fn version_number(line: &str) -> Option<&str> {
    line.trim()
        .strip_prefix("cloudflared version ")?
        .split_whitespace()
        .next()
}

/// Whether cloudflared accepts an argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flags {
    Accepted,
    /// It printed this `Incorrect Usage` line.
    Refused(String),
    /// Neither: it could not be run, or answered something else (exit status, first line).
    Unknown(String),
}

/// Runs `args` (cloudflared's argv without the program) with `--help` appended.
pub async fn check_flags(binary: &Path, args: &[String], timeout: Duration) -> Flags {
    let mut argv = args.to_vec();
    argv.push("--help".into());
    let out = match run(binary, &argv, timeout).await {
        Ok(out) => out,
        Err(e) => return Flags::Unknown(e),
    };
    if let Some(line) = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .find(|l| l.contains("Incorrect Usage"))
    {
        return Flags::Refused(line.trim().to_string());
    }
    if out.code == Some(0) {
        Flags::Accepted
    } else {
        Flags::Unknown(format!(
            "exit {}: {}",
            out.code.map_or("by signal".to_string(), |c| c.to_string()),
            first_line(&out)
        ))
    }
}

fn first_line(out: &Output) -> String {
    out.stderr
        .lines()
        .chain(out.stdout.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_numbers() {
        assert_eq!(
            version_number("cloudflared version 2026.8.2 (built 2026-08-14T11:22 UTC)"),
            Some("2026.8.2")
        );
        assert_eq!(version_number("something else"), None);
    }

    /// A shell script standing in for a binary: both verdicts and the failure to start.
    #[tokio::test]
    async fn flags_verdict_comes_from_the_text() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("cf");
        std::fs::write(
            &script,
            "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --bogus ] && { echo 'Incorrect Usage: flag provided but not defined: -bogus'; exit 0; }; done\n[ \"$1\" = --version ] && echo 'cloudflared version 1.2.3 (built x)'\nexit 0\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t = Duration::from_secs(10);
        assert_eq!(
            version(&script, t).await.unwrap(),
            "cloudflared version 1.2.3 (built x)"
        );
        let ok = ["tunnel".to_string(), "run".to_string()];
        assert_eq!(check_flags(&script, &ok, t).await, Flags::Accepted);
        let bad = ["tunnel".to_string(), "--bogus".to_string()];
        assert_eq!(
            check_flags(&script, &bad, t).await,
            Flags::Refused("Incorrect Usage: flag provided but not defined: -bogus".into())
        );
        let missing = dir.path().join("nope");
        assert!(matches!(
            check_flags(&missing, &ok, t).await,
            Flags::Unknown(e) if e.contains("cannot run")
        ));
    }
}

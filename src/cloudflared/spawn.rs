//! Starting cloudflared: the binary, its argv, an explicit environment, its own process
//! group, and death with the supervisor.
//!
//! `PR_SET_PDEATHSIG` is set in the child between fork and exec. With `unsafe` forbidden
//! there is no `pre_exec`, so the supervisor starts itself as a tiny trampoline
//! (`mcp-tunnel __exec-child`) that sets the signal, checks its parent is still the
//! supervisor, and `execv`s cloudflared; the signal survives exec. The death signal fires
//! when the *thread* that forked exits, so every spawn happens on one dedicated thread that
//! lives as long as the process.

use std::ffi::{CString, OsString};
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::token::Token;
use crate::config::CloudflaredConfig;

/// The bundled binary the packages install.
pub const BUNDLED: &str = "/usr/lib/mcp-tunnel/cloudflared";

/// The running process's own image, whatever has happened to the file it came from.
const RUNNING_IMAGE: &str = "/proc/self/exe";

/// Name of the hidden subcommand that runs the trampoline.
pub const EXEC_CHILD: &str = "__exec-child";

/// Why cloudflared could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "cloudflared.binary: {0}: not found or not executable; install cloudflared, or set [cloudflared] binary, or enabled = false if cloudflared runs as its own service"
    )]
    NotFound(String),
    #[error("cannot start cloudflared ({binary}): {source}")]
    Spawn { binary: String, source: io::Error },
}

/// Finds the binary: the configured path (a bare name is looked up on PATH), else the
/// bundled one, else `cloudflared` on PATH.
pub fn resolve_binary(
    configured: Option<&Path>,
    path_var: Option<&OsString>,
) -> Result<PathBuf, SpawnError> {
    let on_path = |name: &Path| {
        path_var.and_then(|p| {
            std::env::split_paths(p)
                .map(|d| d.join(name))
                .find(|c| is_executable(c))
        })
    };
    match configured {
        Some(p) if p.components().count() == 1 => on_path(p)
            .ok_or_else(|| SpawnError::NotFound(format!("{} (searched PATH)", p.display()))),
        Some(p) => is_executable(p)
            .then(|| p.to_path_buf())
            .ok_or_else(|| SpawnError::NotFound(p.display().to_string())),
        None => {
            let bundled = Path::new(BUNDLED);
            if is_executable(bundled) {
                return Ok(bundled.to_path_buf());
            }
            on_path(Path::new("cloudflared")).ok_or_else(|| {
                SpawnError::NotFound(format!("{BUNDLED} (bundled) and cloudflared on PATH"))
            })
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// cloudflared's argv (without the program): the token is never on it.
pub fn args(
    cfg: &CloudflaredConfig,
    log_level: &str,
    metrics: SocketAddr,
    origin: SocketAddr,
) -> Vec<String> {
    let origin = origin_addr(origin);
    vec![
        "tunnel".into(),
        "--no-autoupdate".into(),
        "--metrics".into(),
        metrics.to_string(),
        "--output".into(),
        "json".into(),
        "--loglevel".into(),
        cfg.loglevel
            .clone()
            .unwrap_or_else(|| log_level.to_string()),
        "--grace-period".into(),
        format!("{}s", cfg.grace_period.as_secs().max(1)),
        "run".into(),
        "--url".into(),
        format!("http://{origin}"),
    ]
}

/// Where a local client reaches a listener bound to `listen`: an unspecified address (every
/// interface) is reached on loopback. cloudflared's `--url` and `doctor`'s probe use it.
pub fn origin_addr(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        a => a,
    }
}

/// The environment of a cloudflared that is only asked about itself (`--version`, `--help`):
/// nothing but `PATH`, so no token and no `TUNNEL_*` setting can change what it does.
pub fn inspect_env() -> Vec<(String, String)> {
    vec![(
        "PATH".to_string(),
        "/usr/local/bin:/usr/bin:/bin".to_string(),
    )]
}

/// cloudflared's whole environment: nothing inherited except `PATH` (sanitised to system
/// directories is the unit's job) and `HOME`-less defaults; the token; the configured extras.
pub fn env(cfg: &CloudflaredConfig, token: &Token) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("TUNNEL_TOKEN".to_string(), token.value().to_string()),
    ];
    for (k, v) in &cfg.env {
        env.push((k.clone(), v.clone()));
    }
    env
}

/// How the child is launched.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// Through `<exe> __exec-child` (sets the parent-death signal). The normal case.
    Trampoline(PathBuf),
    /// Directly (no parent-death signal); for library use without the binary.
    Direct,
}

impl Launcher {
    /// The running image as the trampoline: `/proc/self/exe`, not the path the process was
    /// started from. A package upgrade replaces that file while the supervisor runs; a
    /// trampoline started from the path would then be the *new* version's, whose
    /// `__exec-child` may differ or refuse, and every cloudflared restart would depend on it.
    /// The kernel keeps the running image reachable there even after the file is replaced.
    pub fn current() -> Launcher {
        let running = Path::new(RUNNING_IMAGE);
        if running.exists() {
            return Launcher::Trampoline(running.to_path_buf());
        }
        match std::env::current_exe() {
            Ok(exe) => Launcher::Trampoline(exe),
            Err(_) => Launcher::Direct,
        }
    }
}

type Request = (Command, String, oneshot::Sender<Result<Child, SpawnError>>);

/// Spawns children from one long-lived thread (see the module comment).
#[derive(Clone)]
pub struct Spawner {
    tx: mpsc::Sender<Request>,
    launcher: Launcher,
}

impl Spawner {
    /// Starts the spawner thread; it enters the current runtime so that tokio can reap
    /// the children it creates.
    pub fn new(launcher: Launcher) -> io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<Request>();
        let handle = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("cloudflared-spawner".into())
            .spawn(move || {
                let _rt = handle.enter();
                // Never returns while the process lives, so the parent-death signal only
                // fires when the supervisor itself is gone.
                while let Ok((mut cmd, binary, reply)) = rx.recv() {
                    let _ = reply.send(
                        cmd.spawn()
                            .map_err(|source| SpawnError::Spawn { binary, source }),
                    );
                }
                loop {
                    std::thread::park();
                }
            })?;
        Ok(Spawner { tx, launcher })
    }

    /// Starts `binary args` with exactly `env`, in a new process group, stdout and stderr
    /// piped for log forwarding.
    pub async fn spawn(
        &self,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Child, SpawnError> {
        let mut cmd = match &self.launcher {
            Launcher::Trampoline(exe) => {
                let mut c = Command::new(exe);
                // `ps` shows the trampoline as mcp-tunnel, not as `exe`, for its instant.
                c.arg0("mcp-tunnel")
                    .arg(EXEC_CHILD)
                    .arg("--parent")
                    .arg(std::process::id().to_string())
                    .arg("--")
                    .arg(binary);
                c
            }
            Launcher::Direct => Command::new(binary),
        };
        cmd.args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let (tx, rx) = oneshot::channel();
        let binary = binary.display().to_string();
        self.tx
            .send((cmd, binary.clone(), tx))
            .map_err(|_| SpawnError::Spawn {
                binary: binary.clone(),
                source: io::Error::other("spawner thread is gone"),
            })?;
        rx.await.map_err(|_| SpawnError::Spawn {
            binary,
            source: io::Error::other("spawner thread is gone"),
        })?
    }
}

/// The trampoline: runs in the child. Sets `PR_SET_PDEATHSIG` to SIGKILL, makes sure the
/// supervisor did not die before that, then replaces itself with `argv`. Returns only on
/// failure (exit code for the caller).
pub fn exec_child(parent: u32, argv: &[OsString]) -> u8 {
    use nix::sys::signal::Signal;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("mcp-tunnel {EXEC_CHILD}: prctl(PR_SET_PDEATHSIG): {e}");
        return 1;
    }
    if nix::unistd::getppid().as_raw() as u32 != parent {
        // The supervisor died between fork and prctl: do not run unsupervised.
        return 1;
    }
    let Some(program) = argv.first() else {
        eprintln!("mcp-tunnel {EXEC_CHILD}: no program given");
        return 2;
    };
    let cargs: Result<Vec<CString>, _> = argv.iter().map(|a| CString::new(a.as_bytes())).collect();
    let (Ok(cprog), Ok(cargs)) = (CString::new(program.as_bytes()), cargs) else {
        eprintln!("mcp-tunnel {EXEC_CHILD}: argument contains a NUL byte");
        return 2;
    };
    let err = nix::unistd::execv(&cprog, &cargs).unwrap_err();
    eprintln!(
        "mcp-tunnel {EXEC_CHILD}: cannot execute {}: {err}",
        program.to_string_lossy()
    );
    127
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trampoline_is_the_running_image_not_its_path() {
        match Launcher::current() {
            Launcher::Trampoline(p) => assert_eq!(p, Path::new("/proc/self/exe")),
            Launcher::Direct => panic!("no trampoline on Linux"),
        }
    }

    #[test]
    fn argv_has_no_token_and_loopback_origin() {
        let cfg = crate::config::Config::parse(
            Path::new("/etc/x.toml"),
            "listen_addr = \":8080\"\n[tls]\ncert_file=\"a\"\nkey_file=\"b\"\n[routes]\n\"a.example.com\" = \"http://10.0.0.1:80\"\n",
        )
        .unwrap();
        let a = args(
            &cfg.cloudflared,
            "info",
            "127.0.0.1:20241".parse().unwrap(),
            cfg.listen_addr,
        );
        assert_eq!(a.last().unwrap(), "http://127.0.0.1:8080");
        assert!(a.windows(2).any(|w| w == ["--metrics", "127.0.0.1:20241"]));
        assert!(!a.iter().any(|x| x.contains("token")));
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e = resolve_binary(Some(Path::new("/nonexistent/cloudflared")), None).unwrap_err();
        assert!(e.to_string().contains("cloudflared.binary"), "{e}");
        let path = OsString::from("/nonexistent-dir");
        let e = resolve_binary(Some(Path::new("cloudflared-xyz")), Some(&path)).unwrap_err();
        assert!(e.to_string().contains("searched PATH"), "{e}");
        assert!(
            resolve_binary(
                Some(Path::new("sh")),
                Some(&OsString::from("/bin:/usr/bin"))
            )
            .is_ok()
        );
    }
}

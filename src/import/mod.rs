//! `mcp-tunnel import --from DIR`: turns a reference deployment folder (the Docker Compose
//! stack of spec sections 3 and 6: `config/mcp-proxy.yaml`, `data/` with the certificates,
//! CA and token, and the Compose `.env`) into this appliance's config file and state
//! directory, printing every decision.
//!
//! Order: read and check every input (all problems at once, nothing written) -> plan the
//! files -> refuse to replace anything that differs unless `--force` (then the old file is
//! kept as `NAME.before-import-<unix time>`) -> write the state directory (0700, secrets 0600,
//! owned by the service user) and then the config file. The caller runs `check` on the result.

pub mod env;
pub mod reference;
pub mod yaml;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cloudflared::token::Token;
use crate::config::Config;
use reference::RefConfig;

/// What to import and where to.
#[derive(Debug, Clone)]
pub struct Options {
    /// The reference deployment folder.
    pub from: PathBuf,
    pub config_out: PathBuf,
    pub state_dir: PathBuf,
    /// Replace files that differ (each old one is kept beside it).
    pub force: bool,
    /// Owner of the state directory and its files; default `mcp-tunnel` when it exists and
    /// this runs as root, else the current user.
    pub owner: Option<String>,
}

/// Why nothing (or not everything) was written.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The folder's contents: every problem, one per line (exit 78).
    #[error("{}", .0.join("\n"))]
    Input(Vec<String>),
    /// Files that exist and differ, without `--force` (exit 1).
    #[error(
        "refusing to overwrite {} (they differ from what the import would write; pass --force to replace them, the old files are kept as NAME.before-import-<time>)",
        .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    WouldOverwrite(Vec<PathBuf>),
    #[error("{0}")]
    Io(String),
}

impl ImportError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ImportError::Input(_) => crate::cli::EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// The packaged example config: replacing it is not overwriting an operator's work.
const PACKAGED_EXAMPLE: &str = include_str!("../../config/mcp-tunnel.toml");

/// One file to write.
struct Planned {
    path: PathBuf,
    bytes: Vec<u8>,
    mode: u32,
    /// Owned by the service user (state files) or left to the caller (the config file).
    service_owned: bool,
}

/// Prints decisions as they are made.
struct Log<'a>(&'a mut dyn Write);

impl Log<'_> {
    fn say(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(self.0, "  - {}", text.as_ref());
    }
    fn head(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(self.0, "{}", text.as_ref());
    }
}

/// Everything read from the folder.
struct Inputs {
    yaml_path: PathBuf,
    config: RefConfig,
    env: Vec<(String, String)>,
    data: PathBuf,
}

fn read_inputs(from: &Path) -> Result<Inputs, ImportError> {
    let yaml_path = from.join("config/mcp-proxy.yaml");
    let text = std::fs::read_to_string(&yaml_path).map_err(|e| {
        ImportError::Input(vec![format!(
            "{}: cannot read: {e} (expected a reference deployment folder: config/mcp-proxy.yaml, data/, .env)",
            yaml_path.display()
        )])
    })?;
    let mut problems = Vec::new();
    let config = match reference::read(&text) {
        Ok(c) => Some(c),
        Err(ps) => {
            for p in ps {
                let at = if p.line > 0 {
                    format!("line {}: ", p.line)
                } else {
                    String::new()
                };
                problems.push(format!(
                    "{}: {at}{}: {}",
                    yaml_path.display(),
                    p.field,
                    p.message
                ));
            }
            None
        }
    };
    let env_path = from.join(".env");
    let env = match std::fs::read_to_string(&env_path) {
        Ok(text) => env::parse(&text).unwrap_or_else(|ps| {
            for (line, msg) in ps {
                problems.push(format!("{}: line {line}: {msg}", env_path.display()));
            }
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            problems.push(format!("{}: cannot read: {e}", env_path.display()));
            Vec::new()
        }
    };
    match config {
        Some(config) if problems.is_empty() => Ok(Inputs {
            yaml_path,
            config,
            env,
            data: from.join("data"),
        }),
        _ => Err(ImportError::Input(problems)),
    }
}

/// A variable for `${NAME}` in the YAML: the folder's `.env`, then `data/<name>` for the
/// two the setup component writes, then this shell's environment.
fn variable(inputs: &Inputs, name: &str) -> Option<(String, String)> {
    if let Some((_, v)) = inputs.env.iter().find(|(k, _)| k == name) {
        return Some((v.clone(), ".env".into()));
    }
    let file = match name {
        "TUNNEL_DOMAIN" => Some("tunnel-domain"),
        "TUNNEL_ID" => Some("tunnel-id"),
        _ => None,
    };
    if let Some(f) = file
        && let Ok(v) = std::fs::read_to_string(inputs.data.join(f))
        && !v.trim().is_empty()
    {
        return Some((v.trim().to_string(), format!("data/{f}")));
    }
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| (v, "the environment of this shell".into()))
}

/// Expands `${NAME}` and `$NAME` as Compose users write them in the YAML.
fn expand(
    inputs: &Inputs,
    field: &str,
    value: &str,
    log: &mut Log<'_>,
    problems: &mut Vec<String>,
) -> String {
    if !value.contains('$') {
        return value.to_string();
    }
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => (inner, inner.len() + 1),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match variable(inputs, name) {
            Some((v, source)) if !name.is_empty() => {
                log.say(format!("{field}: ${{{name}}} = {v:?} (from {source})"));
                out.push_str(&v);
            }
            _ => {
                problems.push(format!(
                    "{}: {field}: {value:?} uses ${{{name}}}, which neither .env, data/ nor the environment defines",
                    inputs.yaml_path.display()
                ));
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// A path as the container saw it (Compose mounts `./data` at `/data`) -> the file here.
fn host_path(inputs: &Inputs, container: &str) -> Option<PathBuf> {
    let from = inputs.data.parent().unwrap_or(Path::new("."));
    let candidates: Vec<PathBuf> = if let Some(rest) = container.strip_prefix("/data/") {
        vec![inputs.data.join(rest)]
    } else if Path::new(container).is_absolute() {
        vec![PathBuf::from(container)]
    } else {
        vec![inputs.data.join(container), from.join(container)]
    };
    candidates.into_iter().find(|p| p.is_file())
}

fn read_file(path: &Path, problems: &mut Vec<String>) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        problems.push(format!("{}: cannot read: {e}", path.display()));
        Vec::new()
    })
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        toml_str(k)
    }
}

/// Imports the folder; decisions go to `out`. Returns the written config path.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<PathBuf, ImportError> {
    let inputs = read_inputs(&opts.from)?;
    let mut log = Log(out);
    let mut problems = Vec::new();
    let state = &opts.state_dir;
    let c = &inputs.config;
    log.head(format!(
        "Importing {} into {} and {}:",
        opts.from.display(),
        opts.config_out.display(),
        state.display()
    ));

    // Listener: loopback, since cloudflared runs on this host.
    let listen = match c.listen_addr.as_deref() {
        None => {
            log.say("listen_addr: not set in the reference -> \"127.0.0.1:8080\"");
            "127.0.0.1:8080".to_string()
        }
        Some(l) => {
            let l = expand(&inputs, "listen_addr", l, &mut log, &mut problems);
            let port = l.rsplit_once(':').map_or("8080", |(_, p)| p).to_string();
            let new = format!("127.0.0.1:{port}");
            log.say(format!(
                "listen_addr: {l:?} -> {new:?}: loopback only, because the supervised cloudflared runs on this host (the reference shared the container's network namespace instead)"
            ));
            new
        }
    };

    // Domain: the YAML's, else what setup or the Console gave (data/tunnel-domain, .env).
    let domain = match &c.tunnel_domain {
        Some(d) => Some(expand(&inputs, "tunnel_domain", d, &mut log, &mut problems)),
        None => variable(&inputs, "TUNNEL_DOMAIN").map(|(d, source)| {
            log.say(format!(
                "tunnel_domain: not in the YAML -> {d:?} (from {source})"
            ));
            d
        }),
    };
    if let (Some(d), Ok(stored)) = (
        &domain,
        std::fs::read_to_string(inputs.data.join("tunnel-domain")),
    ) && !stored.trim().is_empty()
        && stored.trim() != d
    {
        log.say(format!(
            "WARNING: tunnel_domain {d:?} differs from data/tunnel-domain {:?}; the YAML's value is used",
            stored.trim()
        ));
    }

    // Files of the state directory.
    let mut files: Vec<Planned> = Vec::new();
    let secret = |name: &str, bytes: Vec<u8>, mode: u32, files: &mut Vec<Planned>| {
        files.push(Planned {
            path: state.join(name),
            bytes,
            mode,
            service_owned: true,
        });
    };
    for (field, value, name, mode) in [
        ("tls.cert_file", &c.cert_file, "tls.crt", 0o644),
        ("tls.key_file", &c.key_file, "tls.key", 0o600),
    ] {
        let Some(value) = value else {
            problems.push(format!(
                "{}: {field}: missing (the reference requires it)",
                inputs.yaml_path.display()
            ));
            continue;
        };
        let value = expand(&inputs, field, value, &mut log, &mut problems);
        match host_path(&inputs, &value) {
            Some(p) => {
                let bytes = read_file(&p, &mut problems);
                let was = mode_of(&p);
                log.say(format!(
                    "{field}: {value} (in the container) = {} -> {} (mode {:04o}{})",
                    p.display(),
                    state.join(name).display(),
                    mode,
                    if mode == 0o600 && was & 0o077 != 0 {
                        format!(
                            "; it was {was:04o} so that the container's UID 65532 could read it: here only the service user reads it"
                        )
                    } else {
                        String::new()
                    }
                ));
                secret(name, bytes, mode, &mut files);
            }
            None => problems.push(format!(
                "{}: {field}: {value}: not found (looked for {} as the container mounts ./data at /data)",
                inputs.yaml_path.display(),
                inputs
                    .data
                    .join(value.strip_prefix("/data/").unwrap_or(&value))
                    .display()
            )),
        }
    }
    let has = |name: &str| inputs.data.join(name).is_file();
    let (ca_cert, ca_key) = (has("ca.crt"), has("ca.key"));
    if ca_cert {
        secret(
            "ca.crt",
            read_file(&inputs.data.join("ca.crt"), &mut problems),
            0o644,
            &mut files,
        );
    }
    if ca_key {
        secret(
            "ca.key",
            read_file(&inputs.data.join("ca.key"), &mut problems),
            0o600,
            &mut files,
        );
    }
    match (ca_cert, ca_key) {
        (true, true) => log.say(
            "data/ca.crt and data/ca.key -> [certs] ca_cert_file and ca_key_file: the service renews the server certificate itself 30 days before expiry (the reference needed `setup renew-cert` or openssl by hand)",
        ),
        (true, false) => log.say(
            "data/ca.crt (no ca.key) -> [certs] ca_cert_file: new server certificates must chain to it; renew by hand (`mcp-tunnel renew-cert` needs the CA key)",
        ),
        (false, true) => log.say("WARNING: data/ca.key without data/ca.crt: the CA key is not imported"),
        (false, false) => log.say("no data/ca.crt: certificates are not checked against the tunnel CA, and not renewed automatically"),
    }
    for name in ["tunnel-id", "tunnel-domain"] {
        if has(name) {
            secret(
                name,
                read_file(&inputs.data.join(name), &mut problems),
                0o644,
                &mut files,
            );
            log.say(format!(
                "data/{name} -> {} (kept for `mcp-tunnel setup` / [provision], which attach to the same tunnel)",
                state.join(name).display()
            ));
        }
    }

    // The token: data/tunnel-token (programmatic flow), else .env, else this shell.
    let token = if has("tunnel-token") {
        Some((
            read_file(&inputs.data.join("tunnel-token"), &mut problems),
            "data/tunnel-token".to_string(),
        ))
    } else {
        variable(&inputs, "TUNNEL_TOKEN").map(|(v, source)| (v.into_bytes(), source))
    };
    match &token {
        Some((bytes, source)) => match Token::parse(&String::from_utf8_lossy(bytes)) {
            Ok(t) => {
                log.say(format!(
                    "tunnel token (tunnel {}) from {source} -> {} (mode 0600; cloudflared gets it in its environment, never on its command line)",
                    t.tunnel_id(),
                    state.join("tunnel-token").display()
                ));
                let mut value = t.value().as_bytes().to_vec();
                value.push(b'\n');
                secret("tunnel-token", value, 0o600, &mut files);
            }
            Err(why) => problems.push(format!("tunnel token from {source}: {why}")),
        },
        None => log.say(format!(
            "WARNING: no tunnel token (data/tunnel-token, TUNNEL_TOKEN in .env or this shell): write it to {} (mode 0600) before starting the service",
            state.join("tunnel-token").display()
        )),
    }

    // Upstream trust.
    let mut upstream_ca = None;
    if let Some(ca) = &c.upstream_ca_file {
        let ca = expand(&inputs, "upstream.tls.ca_file", ca, &mut log, &mut problems);
        match host_path(&inputs, &ca) {
            Some(p) => {
                let dest = state.join("upstream-ca.pem");
                log.say(format!(
                    "upstream.tls.ca_file: {ca} = {} -> {}",
                    p.display(),
                    dest.display()
                ));
                secret(
                    "upstream-ca.pem",
                    read_file(&p, &mut problems),
                    0o644,
                    &mut files,
                );
                upstream_ca = Some(dest);
            }
            None => problems.push(format!(
                "{}: upstream.tls.ca_file: {ca}: not found",
                inputs.yaml_path.display()
            )),
        }
    }

    // Routes.
    let mut routes = Vec::new();
    for (name, up) in &c.routes {
        let up = expand(
            &inputs,
            &format!("routes.{name}"),
            up,
            &mut log,
            &mut problems,
        );
        if let Ok(u) = crate::config::Upstream::parse(&up)
            && !u.host.contains('.')
            && u.host.parse::<std::net::IpAddr>().is_err()
            && u.host != "localhost"
        {
            log.say(format!(
                "routes.{name}: {up}: {:?} looks like a Compose service name; on this host it must resolve (DNS or /etc/hosts) to an address inside upstream.allowed_ips",
                u.host
            ));
        }
        routes.push((name.clone(), up));
    }
    if !routes.is_empty() {
        log.say(format!(
            "routes: {} route{} kept as written; the Host header is rewritten to each upstream's host:port (Python MCP SDK servers bound to loopback answer 421 to a foreign Host); write `name = {{ upstream = \"...\", preserve_host = true }}` to send the caller's Host instead",
            routes.len(),
            if routes.len() == 1 { "" } else { "s" }
        ));
    }
    let ignored: Vec<&str> = inputs
        .env
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !["TUNNEL_TOKEN", "TUNNEL_DOMAIN"].contains(k))
        .collect();
    if c.allowed_ips.is_none() && c.disable_ip_validation != Some(true) {
        log.say("upstream.allowed_ips: not set -> the same default as the reference (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)");
    }
    if !ignored.is_empty() {
        log.say(format!(
            ".env: not used by the proxy or cloudflared, ignored: {} (programmatic provisioning: see [provision] in docs/PROVISIONING.md)",
            ignored.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(ImportError::Input(problems));
    }

    // The config file.
    let mut t = String::new();
    t.push_str(&format!(
        "# Imported by `mcp-tunnel import` from {}.\n# Every field is documented in /usr/share/doc/mcp-tunnel/examples/mcp-tunnel.toml.\n# Validate after every edit:  mcp-tunnel check --config {}\n\n",
        inputs.yaml_path.display(),
        opts.config_out.display()
    ));
    t.push_str(&format!("listen_addr = {}\n", toml_str(&listen)));
    if let Some(l) = &c.log_level {
        t.push_str(&format!("log_level = {}\n", toml_str(l)));
    }
    if let Some(s) = &c.shutdown_timeout {
        t.push_str(&format!("shutdown_timeout = {}\n", toml_str(s)));
    }
    if let Some(d) = &domain {
        t.push_str(&format!("tunnel_domain = {}\n", toml_str(d)));
    }
    t.push_str(&format!(
        "\n[tls]\ncert_file = {}\nkey_file = {}\n\n[routes]\n",
        toml_str(&state.join("tls.crt").to_string_lossy()),
        toml_str(&state.join("tls.key").to_string_lossy())
    ));
    for (name, up) in &routes {
        t.push_str(&format!("{} = {}\n", toml_key(name), toml_str(up)));
    }
    t.push_str("\n[upstream]\n");
    if let Some(ips) = &c.allowed_ips {
        let list: Vec<String> = ips.iter().map(|i| toml_str(i)).collect();
        t.push_str(&format!("allowed_ips = [{}]\n", list.join(", ")));
    }
    if c.disable_ip_validation == Some(true) {
        t.push_str("disable_ip_validation = true\n");
        log.say("WARNING: upstream.disable_ip_validation = true kept: every address is allowed (no SSRF protection)");
    }
    if upstream_ca.is_some() || c.include_system_cas.is_some() {
        t.push_str("\n[upstream.tls]\n");
        if let Some(p) = &upstream_ca {
            t.push_str(&format!("ca_file = {}\n", toml_str(&p.to_string_lossy())));
        }
        if let Some(b) = c.include_system_cas {
            t.push_str(&format!("include_system_cas = {b}\n"));
        }
    }
    if ca_cert {
        t.push_str(&format!(
            "\n[certs]\nca_cert_file = {}\n",
            toml_str(&state.join("ca.crt").to_string_lossy())
        ));
        if ca_key {
            t.push_str(&format!(
                "ca_key_file = {}\n",
                toml_str(&state.join("ca.key").to_string_lossy())
            ));
        }
    }
    t.push_str(&format!(
        "\n[cloudflared]\n# The reference ran cloudflared as its own container; here the service supervises it.\ntoken_file = {}\n",
        toml_str(&state.join("tunnel-token").to_string_lossy())
    ));
    if let Err(e) = Config::parse(&opts.config_out, &t) {
        return Err(ImportError::Input(
            e.problems
                .iter()
                .map(|p| {
                    format!(
                        "{}: {}: {} (after translating to {})",
                        inputs.yaml_path.display(),
                        p.field,
                        p.message,
                        opts.config_out.display()
                    )
                })
                .collect(),
        ));
    }
    files.push(Planned {
        path: opts.config_out.clone(),
        bytes: t.into_bytes(),
        mode: 0o644,
        service_owned: false,
    });

    // Nothing that differs is replaced without --force.
    let conflicts: Vec<PathBuf> = files
        .iter()
        .filter(|f| match std::fs::read(&f.path) {
            Ok(old) => {
                old != f.bytes && !(f.path == opts.config_out && old == PACKAGED_EXAMPLE.as_bytes())
            }
            Err(_) => f.path.exists(),
        })
        .map(|f| f.path.clone())
        .collect();
    if !conflicts.is_empty() && !opts.force {
        return Err(ImportError::WouldOverwrite(conflicts));
    }

    let owner = resolve_owner(opts.owner.as_deref(), &mut log)?;
    write_all(state, &files, &conflicts, owner, &mut log)?;
    Ok(opts.config_out.clone())
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o7777)
}

/// `(uid, gid)` to give the state files, or `None` to leave them to the current user.
fn resolve_owner(
    requested: Option<&str>,
    log: &mut Log<'_>,
) -> Result<Option<(u32, u32)>, ImportError> {
    use nix::unistd::{Uid, User};
    let lookup = |name: &str| {
        User::from_name(name)
            .map_err(|e| ImportError::Io(format!("--owner {name}: cannot look the user up: {e}")))
    };
    match requested {
        Some(name) => match lookup(name)? {
            Some(u) => {
                log.say(format!(
                    "owner: {name} (uid {}, gid {}) as requested",
                    u.uid, u.gid
                ));
                Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
            }
            None => Err(ImportError::Io(format!(
                "--owner {name}: no such user on this host"
            ))),
        },
        None => {
            let me = Uid::effective();
            match lookup("mcp-tunnel")? {
                Some(u) if me.is_root() => {
                    log.say(format!(
                        "owner: mcp-tunnel (uid {}), the packaged service's user",
                        u.uid
                    ));
                    Ok(Some((u.uid.as_raw(), u.gid.as_raw())))
                }
                Some(_) => {
                    log.say(format!(
                        "owner: the current user (uid {me}): not root, so the files cannot be given to mcp-tunnel; run as root, or chown -R mcp-tunnel: the state directory"
                    ));
                    Ok(None)
                }
                None => {
                    log.say(format!(
                        "owner: the current user (uid {me}): there is no mcp-tunnel user on this host (the package creates it; or pass --owner USER)"
                    ));
                    Ok(None)
                }
            }
        }
    }
}

fn write_all(
    state: &Path,
    files: &[Planned],
    conflicts: &[PathBuf],
    owner: Option<(u32, u32)>,
    log: &mut Log<'_>,
) -> Result<(), ImportError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path, e: &dyn std::fmt::Display| ImportError::Io(format!("{}: {e}", p.display()));
    let chown = |p: &Path| match owner {
        Some((uid, gid)) => {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| io(p, &e))
        }
        None => Ok(()),
    };
    if !state.is_dir() {
        std::fs::create_dir_all(state).map_err(|e| io(state, &e))?;
        log.say(format!("created {} (mode 0700)", state.display()));
    }
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io(state, &e))?;
    chown(state)?;
    let stamp = crate::supervisor::reload::unix_now();
    for f in files {
        if let Some(dir) = f.path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
        }
        if conflicts.contains(&f.path) {
            let name = f.path.file_name().unwrap_or_default().to_string_lossy();
            let backup = f
                .path
                .with_file_name(format!("{name}.before-import-{stamp}"));
            std::fs::rename(&f.path, &backup).map_err(|e| io(&f.path, &e))?;
            log.say(format!(
                "--force: kept the previous {} as {}",
                f.path.display(),
                backup.display()
            ));
        }
        crate::certs::write_atomic(&f.path, &f.bytes, f.mode).map_err(|e| io(&f.path, &e))?;
        if f.service_owned {
            chown(&f.path)?;
        }
    }
    log.say(format!("wrote {} files; the config file last", files.len()));
    Ok(())
}

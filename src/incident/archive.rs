//! `mcp-tunnel setup archive --tunnel ID --yes-archive-permanently [--reprovision]`: the
//! runbook's "archive the tunnel", after this host is severed, and optionally a fresh tunnel
//! at once. Archiving is the only thing that severs every connector of a tunnel (a rotated
//! token only refuses new ones), and it cannot be undone: the domain is retired forever.

use std::path::{Path, PathBuf};

use crate::provision::{self, ProvisionError, Settings, state};

/// State files of one tunnel: set aside whole before a new tunnel is provisioned, so that
/// nothing of the archived tunnel (its CA key above all) is reused or lost.
const TUNNEL_FILES: [&str; 10] = [
    state::TUNNEL_ID,
    state::TUNNEL_DOMAIN,
    state::TUNNEL_TOKEN,
    state::TLS_CRT,
    state::TLS_KEY,
    state::CA_CRT,
    state::CA_KEY,
    state::TOKEN_VERSION,
    state::CA_NEXT_CRT,
    state::CA_NEXT_KEY,
];

/// What the archive did.
pub struct Archived {
    pub tunnel_id: String,
    pub domain: String,
    /// It was archived before this run (a repeat): nothing changed.
    pub already: bool,
    pub archived_at: Option<String>,
    /// With `--reprovision`: the new tunnel and where the old state went.
    pub fresh: Option<(provision::Outcome, PathBuf)>,
}

/// Archives `tunnel_id`; with `reprovision`, sets the state directory's files of that tunnel
/// aside and provisions a new tunnel through `provision::ensure` (new CA, certificate,
/// token). A state directory that holds another tunnel is refused before anything is sent.
pub async fn run(
    settings: &Settings,
    tunnel_id: &str,
    reprovision: bool,
) -> Result<Archived, ProvisionError> {
    let stored = std::fs::read_to_string(settings.output.join(state::TUNNEL_ID))
        .ok()
        .map(|s| s.trim().to_string());
    if reprovision && stored.as_deref().is_some_and(|s| s != tunnel_id) {
        return Err(ProvisionError::Config(format!(
            "the state directory {} holds tunnel {}, not {tunnel_id}: nothing was archived. Archive the tunnel this host runs, or give --output the directory of {tunnel_id}",
            settings.output.display(),
            stored.unwrap_or_default()
        )));
    }
    let client = settings.client();
    let before = client.get_tunnel(tunnel_id).await?;
    let after = client.archive_tunnel(tunnel_id).await?;
    let mut out = Archived {
        tunnel_id: after.id.clone(),
        domain: after.domain.clone(),
        already: before.archived_at.is_some(),
        archived_at: after.archived_at.clone(),
        fresh: None,
    };
    if !reprovision {
        return Ok(out);
    }
    let aside = set_aside(&settings.output, tunnel_id)?;
    let mut fresh = settings.clone();
    fresh.tunnel_id = None;
    fresh.new_ca = false;
    let o = provision::ensure(&fresh).await?;
    out.fresh = Some((o, aside));
    Ok(out)
}

/// Moves the archived tunnel's files into `archived-<tunnel>-<unix time>/` in the state
/// directory (renames within one file system: each file is whole in one place or the other).
fn set_aside(dir: &Path, tunnel_id: &str) -> Result<PathBuf, ProvisionError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let safe: String = tunnel_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let aside = dir.join(format!("archived-{safe}-{now}"));
    let io = |e: std::io::Error, what: &Path| {
        ProvisionError::Config(format!(
            "cannot set the archived tunnel's files aside ({}): {e}",
            what.display()
        ))
    };
    std::fs::create_dir_all(&aside).map_err(|e| io(e, &aside))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // It holds private keys: owner-only, as the state directory itself.
        std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(e, &aside))?;
    }
    for name in TUNNEL_FILES {
        let from = dir.join(name);
        if from.exists() {
            std::fs::rename(&from, aside.join(name)).map_err(|e| io(e, &from))?;
        }
    }
    Ok(aside)
}

/// The Console steps, for a deployment without Tunnels API credentials.
pub fn console_steps(tunnel_id: &str) -> String {
    format!(
        "no Tunnels API credentials (API_TOKEN, or the workload identity settings of [provision]): archive in the Console instead:\n  1. Console -> Tunnels -> {tunnel_id} -> Archive (irreversible: the domain is retired, the token invalidated)\n  2. create a new tunnel there, upload a new CA (`mcp-tunnel certs init --tunnel-domain <new domain> --dir DIR`), and install its token and certificate on this host\n  3. switch Managed Agent sessions and mcp_servers entries to the new domain's URLs\nThis host was severed first; lift it with `mcp-tunnel sever --lift` once the new tunnel is installed."
    )
}

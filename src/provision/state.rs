//! The state directory (`dir:` output): the reference layout, written atomically, secrets
//! owner-only, and rewritten only when the content changes so that an idempotent rerun leaves
//! every file (and its mtime) as it was.

use std::path::{Path, PathBuf};

use crate::certs::{CertError, write_atomic};

pub const TUNNEL_ID: &str = "tunnel-id";
pub const TUNNEL_DOMAIN: &str = "tunnel-domain";
pub const TUNNEL_TOKEN: &str = "tunnel-token";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// The last applied `--token-version` (where the reference keeps it is not documented).
pub const TOKEN_VERSION: &str = "token-version";
/// A CA being rotated in: written before it is registered, so a crash mid-rotation resumes
/// with the same key instead of filling the second certificate slot with an orphan.
pub const CA_NEXT_CRT: &str = "ca-next.crt";
pub const CA_NEXT_KEY: &str = "ca-next.key";
/// The CA rotated out, kept until its certificate record is archived.
pub const CA_PREVIOUS_CRT: &str = "ca-previous.crt";

/// Files that hold a credential or a private key.
const SECRETS: [&str; 4] = [TUNNEL_TOKEN, TLS_KEY, CA_KEY, CA_NEXT_KEY];

/// The mode a state file gets: 0600 for secrets, 0644 otherwise.
pub fn mode_of(name: &str) -> u32 {
    if SECRETS.contains(&name) {
        0o600
    } else {
        0o644
    }
}

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens `path`, creating it with mode 0700 when missing.
    pub fn create(path: &Path) -> Result<StateDir, CertError> {
        use std::os::unix::fs::DirBuilderExt;
        if !path.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|source| CertError::Write {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    /// Opens `path` without creating anything.
    pub fn open(path: &Path) -> StateDir {
        StateDir {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A file's content, `None` when it is missing or empty. Whitespace around one-line values
    /// is dropped (an operator may have written them with `echo`).
    pub fn read(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.file(name)).ok()?;
        let value = if name.ends_with(".crt") || name.ends_with(".key") {
            text
        } else {
            text.trim().to_string()
        };
        (!value.trim().is_empty()).then_some(value)
    }

    /// Writes `name` when its content differs (and fixes its mode when only that differs);
    /// returns whether the content changed.
    pub fn write(&self, name: &str, content: &str) -> Result<bool, CertError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.file(name);
        let mode = mode_of(name);
        if std::fs::read(&path).is_ok_and(|old| old == content.as_bytes()) {
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.permissions().mode() & 0o777 != mode
            {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(|source| CertError::Write { path, source })?;
            }
            return Ok(false);
        }
        write_atomic(&path, content.as_bytes(), mode)?;
        Ok(true)
    }

    /// Writes files that belong together (a key and its certificate) as [`write`] does,
    /// but all or none: on a full disk the old pair stays whole (`certs::write_atomic_all`).
    /// Returns whether any content changed.
    ///
    /// [`write`]: StateDir::write
    pub fn write_together(&self, files: &[(&str, &str)]) -> Result<bool, CertError> {
        let changed: Vec<(PathBuf, &str, u32)> = files
            .iter()
            .filter(|(name, content)| {
                !std::fs::read(self.file(name)).is_ok_and(|old| old == content.as_bytes())
            })
            .map(|(name, content)| (self.file(name), *content, mode_of(name)))
            .collect();
        for (name, content) in files {
            if changed.iter().all(|(p, _, _)| *p != self.file(name)) {
                self.write(name, content)?;
            }
        }
        let batch: Vec<(&Path, &[u8], u32)> = changed
            .iter()
            .map(|(p, c, m)| (p.as_path(), c.as_bytes(), *m))
            .collect();
        crate::certs::write_atomic_all(&batch)?;
        Ok(!changed.is_empty())
    }

    pub fn remove(&self, name: &str) -> Result<(), CertError> {
        match std::fs::remove_file(self.file(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CertError::Write {
                path: self.file(name),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// True when the directory holds no provisioned tunnel (no `tunnel-id`): the signal for
    /// `run` to provision at start.
    pub fn is_unprovisioned(&self) -> bool {
        self.read(TUNNEL_ID).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_only_changes_and_keeps_secret_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::create(&tmp.path().join("state")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert!(dir.write(TUNNEL_TOKEN, "t1").unwrap());
        assert!(!dir.write(TUNNEL_TOKEN, "t1").unwrap());
        assert_eq!(mode(&dir.file(TUNNEL_TOKEN)), 0o600);
        std::fs::set_permissions(
            dir.file(TUNNEL_TOKEN),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(!dir.write(TUNNEL_TOKEN, "t1").unwrap());
        assert_eq!(mode(&dir.file(TUNNEL_TOKEN)), 0o600);
        assert!(dir.write(TUNNEL_DOMAIN, "a.example").unwrap());
        assert_eq!(mode(&dir.file(TUNNEL_DOMAIN)), 0o644);
        assert_eq!(dir.read(TUNNEL_DOMAIN).as_deref(), Some("a.example"));
        assert!(dir.is_unprovisioned());
    }
}

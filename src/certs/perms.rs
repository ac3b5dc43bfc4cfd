//! Secret files (TLS key, CA key, tunnel token) must not be readable by group or others, and
//! a symlink that leads out of the configured directory is announced rather than followed
//! silently.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::warn;

/// A secret file that may not be used as it is; the message says what to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field} ({path}) is readable by group or others (mode {mode:04o}): run `chmod 600 {path}`, or set allow_readable_secrets = true if a container setup needs it"
)]
pub struct TooOpen {
    pub field: &'static str,
    pub path: String,
    pub mode: u32,
}

/// Checks one secret file. A missing file is left to the loader (which names it); a mode
/// open to group or others is refused unless `allow_readable`.
pub fn check_secret(field: &'static str, path: &Path, allow_readable: bool) -> Result<(), TooOpen> {
    warn_if_symlink_escapes(field, path);
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 && !allow_readable {
        return Err(TooOpen {
            field,
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Logs when `path` is a symlink whose target lies outside the directory `path` is in.
pub fn warn_if_symlink_escapes(field: &str, path: &Path) {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return;
    }
    let (Ok(target), Some(dir)) = (std::fs::canonicalize(path), path.parent()) else {
        return;
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !target.starts_with(&dir) {
        warn!(
            field,
            path = %path.display(),
            target = %target.display(),
            "secret file is a symlink leading out of its configured directory; following it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_or_world_readable_secrets_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls.key");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_secret("tls.key_file", &key, false).unwrap_err();
        assert_eq!(err.mode, 0o644);
        assert!(
            err.to_string()
                .contains(&format!("chmod 600 {}", key.display())),
            "{err}"
        );
        assert!(check_secret("tls.key_file", &key, true).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(check_secret("tls.key_file", &key, false).is_err());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_secret("tls.key_file", &key, false).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(check_secret("tls.key_file", &key, false).is_ok());
    }
}

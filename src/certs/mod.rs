//! Certificates: loading the inner-TLS server pair, and issuing a CA and server certificates.

pub mod issue;
pub mod perms;
pub mod preflight;
pub mod renew;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::TlsFiles;

/// Why a certificate or key could not be used; each names the config field and file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{field} ({}): cannot read: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{field} ({}): {what}", path.display())]
    Invalid {
        field: &'static str,
        path: PathBuf,
        what: String,
    },
    #[error(
        "tls.key_file ({}) does not match the certificate in tls.cert_file ({}): expected the private key of that certificate",
        key.display(),
        cert.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot issue certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("cannot generate the key: {0}")]
    KeyGen(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Loads the server certificate chain and key, and proves they belong together, so that a
/// mismatched pair is refused at load time rather than at the first handshake.
pub fn load_server_pair(tls: &TlsFiles) -> Result<Arc<CertifiedKey>, CertError> {
    let certs = load_certs("tls.cert_file", &tls.cert_file)?;
    let key = load_key("tls.key_file", &tls.key_file)?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::Invalid {
            field: "tls.key_file",
            path: tls.key_file.clone(),
            what: format!(
                "unsupported private key (expected RSA, ECDSA P-256/P-384 or Ed25519): {e}"
            ),
        })?;
    let certified = CertifiedKey::new(certs, signer);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(CertError::Mismatch {
            cert: tls.cert_file.clone(),
            key: tls.key_file.clone(),
        }),
        Err(e) => Err(CertError::Invalid {
            field: "tls.cert_file",
            path: tls.cert_file.clone(),
            what: format!("cannot compare the certificate with its key: {e}"),
        }),
    }
}

/// Reads every certificate in a PEM file (leaf first).
pub fn load_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid {
            field,
            path: path.to_path_buf(),
            what: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Invalid {
            field,
            path: path.to_path_buf(),
            what: "no certificate found: expected a PEM block \"BEGIN CERTIFICATE\"".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read(field, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| CertError::Invalid {
        field,
        path: path.to_path_buf(),
        what: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no private key found: expected a PEM block \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\"".into()
            }
            other => format!("malformed PEM: {other}"),
        },
    })
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file so that readers see either the old or the new content, never half of it:
/// temp file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    write_atomic_all(&[(path, bytes, mode)])
}

/// Writes files that only make sense together (a key and its certificate) so that either
/// all of them land or none does: every one is written whole to a temp file and fsynced
/// first, and only then are they renamed into place. A full disk or any other failure
/// while writing leaves the old files as they were and no temp file behind; the error
/// names the file that could not be written.
pub fn write_atomic_all(files: &[(&Path, &[u8], u32)]) -> Result<(), CertError> {
    let mut staged: Vec<(PathBuf, &Path)> = Vec::with_capacity(files.len());
    for (path, bytes, mode) in files {
        match stage(path, bytes, *mode) {
            Ok(tmp) => staged.push((tmp, path)),
            Err(e) => {
                for (tmp, _) in &staged {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e);
            }
        }
    }
    // Renames need no space; one can still fail (the target became a directory), and then
    // the temp files of the rest are removed too.
    for (renamed, (tmp, path)) in staged.iter().enumerate() {
        if let Err(source) = std::fs::rename(tmp, path) {
            for (tmp, _) in &staged[renamed..] {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(CertError::Write {
                path: path.to_path_buf(),
                source,
            });
        }
        if let Ok(d) = std::fs::File::open(parent(path)) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The temp file beside `path`, written whole and fsynced (removed again on failure).
fn stage(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, CertError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = parent(path).join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(bytes))
        .and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_written_together_land_all_or_none_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("tls.key"), dir.path().join("tls.crt"));
        std::fs::write(&key, "old key").unwrap();
        std::fs::write(&cert, "old cert").unwrap();
        // The second file cannot be written (its directory does not exist): the first,
        // already staged, is not renamed into place, and its temp file is gone.
        let nowhere = dir.path().join("missing").join("tls.crt");
        let e = write_atomic_all(&[(&key, b"new key", 0o600), (&nowhere, b"new cert", 0o644)])
            .unwrap_err();
        assert!(e.to_string().contains("missing/tls.crt"), "{e}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "old key");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        write_atomic_all(&[(&key, b"new key", 0o600), (&cert, b"new cert", 0o644)]).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "new key");
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "new cert");
    }
}

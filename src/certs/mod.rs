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
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

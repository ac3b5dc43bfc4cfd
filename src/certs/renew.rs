//! Renewal: deciding when (pure functions of injected time) and issuing a new server
//! certificate from the local CA.

use std::path::Path;
use std::time::Duration;

use super::issue::{IssuedPair, KeyType, issue_server_at};
use super::{CertError, write_atomic_all};

/// Where renewal reads the CA and writes the server pair.
pub struct RenewFiles<'a> {
    pub ca_cert: &'a Path,
    pub ca_key: &'a Path,
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// Issues a server certificate for `domain` from the CA on disk, valid from `now`, and
/// writes it over the current pair.
pub fn renew_files(
    files: &RenewFiles<'_>,
    domain: &str,
    validity: Duration,
    key_type: KeyType,
    now: i64,
) -> Result<(), CertError> {
    let read = |field: &'static str, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CertError::Read {
            field,
            path: path.to_path_buf(),
            source,
        })
    };
    let ca = IssuedPair {
        cert_pem: read("certs.ca_cert_file", files.ca_cert)?,
        key_pem: read("certs.ca_key_file", files.ca_key)?,
    };
    let pair = issue_server_at(&ca, domain, validity, key_type, now)?;
    write_pair(&pair, files.cert_file, files.key_file)
}

/// Whether a certificate expiring at `not_after` is due for renewal at `now`.
pub fn due(not_after: i64, now: i64, renew_before: Duration) -> bool {
    not_after - now <= renew_before.as_secs() as i64
}

/// Days-left thresholds at which an expiry without a CA key to renew it is announced.
pub const WARN_DAYS: [i64; 4] = [30, 14, 7, 1];

/// The tightest warning threshold reached at `now` (`Some(7)` with 5 days left), or `None`.
pub fn warning_threshold(not_after: i64, now: i64) -> Option<i64> {
    let left_days = (not_after - now).div_euclid(86400);
    WARN_DAYS.iter().rev().copied().find(|d| left_days <= *d)
}

/// Writes a renewed pair, all or none (key 0600): both are written whole first, so a full
/// disk leaves the old pair as it was; then the key is renamed into place, then the
/// certificate. A watcher that sees the key before the certificate refuses the mismatched
/// pair and keeps the old one until the certificate lands.
pub fn write_pair(pair: &IssuedPair, cert_file: &Path, key_file: &Path) -> Result<(), CertError> {
    write_atomic_all(&[
        (key_file, pair.key_pem.as_bytes(), 0o600),
        (cert_file, pair.cert_pem.as_bytes(), 0o644),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;

    #[test]
    fn due_table() {
        let month = Duration::from_secs(30 * DAY as u64);
        for (left_days, want) in [
            (90, false),
            (31, false),
            (30, true),
            (29, true),
            (0, true),
            (-3, true),
        ] {
            assert_eq!(
                due(1_000 * DAY + left_days * DAY, 1_000 * DAY, month),
                want,
                "{left_days} days left"
            );
        }
        assert!(!due(5, 0, Duration::ZERO) && due(0, 0, Duration::ZERO));
    }

    #[test]
    fn warning_table() {
        let now = 1_000 * DAY;
        for (left, want) in [
            (60 * DAY, None),
            (31 * DAY, None),
            (30 * DAY, Some(30)),
            (29 * DAY, Some(30)),
            (14 * DAY, Some(14)),
            (13 * DAY, Some(14)),
            (7 * DAY, Some(7)),
            (5 * DAY, Some(7)),
            (DAY, Some(1)),
            (DAY / 2, Some(1)),
            (-DAY, Some(1)),
        ] {
            assert_eq!(warning_threshold(now + left, now), want, "{left}s left");
        }
    }
}

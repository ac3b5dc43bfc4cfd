//! `[certs]`: the local CA used to check and renew the server certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::duration;
use crate::certs::issue::KeyType;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCerts {
    ca_cert_file: Option<PathBuf>,
    ca_key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    renew_before: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    cert_duration: Option<Duration>,
    key_type: Option<KeyType>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    check_interval: Option<Duration>,
}

/// Validated `[certs]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertsConfig {
    /// The tunnel CA's certificate: the server certificate must chain to it (AKI = SKI).
    pub ca_cert_file: Option<PathBuf>,
    /// The CA's key: with it the supervisor renews the server certificate itself.
    pub ca_key_file: Option<PathBuf>,
    pub renew_before: Duration,
    pub cert_duration: Duration,
    pub key_type: KeyType,
    /// How often expiry is looked at.
    pub check_interval: Duration,
}

impl RawCerts {
    pub(super) fn validate(self, base: &Path, problems: &mut Vec<(String, String)>) -> CertsConfig {
        if self.ca_key_file.is_some() && self.ca_cert_file.is_none() {
            problems.push((
                "certs.ca_key_file".into(),
                "needs certs.ca_cert_file too: renewal signs with the key and chains to the certificate".into(),
            ));
        }
        let cfg = CertsConfig {
            ca_cert_file: self.ca_cert_file.map(|p| base.join(p)),
            ca_key_file: self.ca_key_file.map(|p| base.join(p)),
            renew_before: self.renew_before.unwrap_or(Duration::from_secs(30 * 86400)),
            cert_duration: self
                .cert_duration
                .unwrap_or(Duration::from_secs(2160 * 3600)),
            key_type: self.key_type.unwrap_or_default(),
            check_interval: self.check_interval.unwrap_or(Duration::from_secs(3600)),
        };
        if cfg.renew_before >= cfg.cert_duration {
            problems.push((
                "certs.renew_before".into(),
                format!(
                    "expected less than certs.cert_duration ({}), or every renewed certificate would be due at once",
                    humantime::format_duration(cfg.cert_duration)
                ),
            ));
        }
        if cfg.check_interval.is_zero() {
            problems.push((
                "certs.check_interval".into(),
                "expected a duration above zero".into(),
            ));
        }
        cfg
    }
}

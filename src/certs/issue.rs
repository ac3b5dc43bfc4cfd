//! Issuing a tunnel CA and inner-TLS server certificates with rcgen.
//!
//! The shapes follow the spec's certificate requirements (section 9.4): a CA with critical
//! basicConstraints CA:TRUE, keyUsage keyCertSign + cRLSign and an SKI; a server certificate
//! with SAN `<domain>` and `*.<domain>`, an AKI equal to the CA's SKI and EKU serverAuth.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

use super::{CertError, write_atomic};

/// A freshly issued CA: its certificate and key, PEM-encoded.
pub struct IssuedPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA and the server certificate it signed.
pub struct Pki {
    pub ca: IssuedPair,
    pub server: IssuedPair,
}

fn ca_params(validity: Duration) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mcp-tunnel-ca");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
    Ok(params)
}

/// Key algorithm of issued server certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA P-256: small, fast handshakes; accepted by the edge (spec 9.4).
    #[default]
    EcdsaP256,
}

impl KeyType {
    pub fn generate(self) -> Result<KeyPair, CertError> {
        match self {
            KeyType::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
        }
    }
}

/// Server certificate parameters for a tunnel domain, valid from `now` (Unix seconds).
pub fn server_params_at(
    domain: &str,
    now: i64,
    validity: Duration,
) -> Result<CertificateParams, CertError> {
    let now =
        OffsetDateTime::from_unix_timestamp(now).unwrap_or_else(|_| OffsetDateTime::now_utc());
    let mut params = server_params(domain, validity)?;
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
    Ok(params)
}

/// Server certificate parameters for a tunnel domain.
fn server_params(domain: &str, validity: Duration) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(vec![domain.to_string(), format!("*.{domain}")])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, domain);
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
    Ok(params)
}

/// Generates an ECDSA P-256 CA and a server certificate for `domain` signed by it.
pub fn generate(
    domain: &str,
    ca_validity: Duration,
    server_validity: Duration,
) -> Result<Pki, CertError> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca_params = ca_params(ca_validity)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let server_cert = server_params(domain, server_validity)?.signed_by(&server_key, &issuer)?;
    Ok(Pki {
        ca: IssuedPair {
            cert_pem: ca_cert.pem(),
            key_pem: ca_key.serialize_pem(),
        },
        server: IssuedPair {
            cert_pem: server_cert.pem(),
            key_pem: server_key.serialize_pem(),
        },
    })
}

impl Pki {
    /// Writes `ca.crt`, `ca.key`, `tls.crt`, `tls.key` (the reference `dir:` layout); keys 0600.
    pub fn write_to(&self, dir: &Path) -> Result<(), CertError> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join("ca.crt"), self.ca.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join("ca.key"), self.ca.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join("tls.crt"), self.server.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join("tls.key"), self.server.key_pem.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// Five years, as the setup component issues its CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86400);
/// 90 days (`2160h`), the reference server-certificate lifetime.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(2160 * 3600);

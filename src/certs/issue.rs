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
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use super::{CertError, write_atomic, write_atomic_all};

/// A certificate and its private key, PEM-encoded (no Debug: it holds a key).
#[derive(Clone)]
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
    /// RSA 4096, what the reference setup component issues (slow to generate: seconds).
    Rsa4096,
}

impl KeyType {
    pub fn generate(self) -> Result<KeyPair, CertError> {
        match self {
            KeyType::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
            KeyType::Rsa4096 => {
                use rsa::pkcs8::{EncodePrivateKey, LineEnding};
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 4096)
                    .map_err(|e| CertError::KeyGen(e.to_string()))?;
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| CertError::KeyGen(e.to_string()))?;
                Ok(KeyPair::from_pkcs8_pem_and_sign_algo(
                    &pem,
                    &rcgen::PKCS_RSA_SHA256,
                )?)
            }
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
    let ca = generate_ca(ca_validity)?;
    let server = issue_server(&ca, domain, server_validity)?;
    Ok(Pki { ca, server })
}

/// Generates an ECDSA P-256 tunnel CA (the setup component's choice) valid for `validity`.
pub fn generate_ca(validity: Duration) -> Result<IssuedPair, CertError> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca_cert = ca_params(validity)?.self_signed(&ca_key)?;
    Ok(IssuedPair {
        cert_pem: ca_cert.pem(),
        key_pem: ca_key.serialize_pem(),
    })
}

/// Issues an ECDSA P-256 server certificate for `domain` and `*.domain` from a CA given as
/// PEM (for example one loaded from the state directory). The issuer name and AKI come from
/// the CA certificate itself, so the chain holds whatever tool made the CA; the validity is
/// clamped to the CA's own `notAfter`, because a leaf that outlives its CA fails verification.
pub fn issue_server(
    ca: &IssuedPair,
    domain: &str,
    validity: Duration,
) -> Result<IssuedPair, CertError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    issue_server_at(ca, domain, validity, KeyType::default(), now)
}

/// As `issue_server`, valid from `now` (Unix seconds; injected so renewal is testable) with
/// a chosen key type.
pub fn issue_server_at(
    ca: &IssuedPair,
    domain: &str,
    validity: Duration,
    key_type: KeyType,
    now: i64,
) -> Result<IssuedPair, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca_key)?;
    let mut params = server_params_at(domain, now, validity)?;
    if let Some(ca_not_after) = not_after_pem(&ca.cert_pem)
        && params.not_after > ca_not_after
    {
        params.not_after = ca_not_after;
    }
    let server_key = key_type.generate()?;
    let server_cert = params.signed_by(&server_key, &issuer)?;
    Ok(IssuedPair {
        cert_pem: server_cert.pem(),
        key_pem: server_key.serialize_pem(),
    })
}

/// The `notAfter` of the first certificate in a PEM string, if it parses.
pub fn not_after_pem(pem: &str) -> Option<OffsetDateTime> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

/// Builds the signing pair the proxy presents, from PEM strings (checked to match), so a
/// freshly issued certificate can be swapped in without a round trip through files.
pub fn certified_key(pair: &IssuedPair) -> Result<std::sync::Arc<CertifiedKey>, CertError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: String| CertError::Invalid {
        field: "tls.cert_file",
        path: Default::default(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("malformed certificate PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
        .map_err(|e| invalid(format!("malformed key PEM: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| invalid(format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signer);
    certified
        .keys_match()
        .map_err(|e| invalid(format!("certificate and key do not match: {e}")))?;
    Ok(std::sync::Arc::new(certified))
}

impl Pki {
    /// Writes `ca.crt`, `ca.key`, `tls.crt`, `tls.key` (the reference `dir:` layout); keys 0600.
    /// Writes the pair and the domain in the reference `dir:` layout (`tunnel-domain`
    /// included, so that `renew-cert` knows the SAN to issue).
    pub fn write_to_with_domain(&self, dir: &Path, domain: &str) -> Result<(), CertError> {
        self.write_to(dir)?;
        write_atomic(&dir.join("tunnel-domain"), domain.as_bytes(), 0o644)
    }

    pub fn write_to(&self, dir: &Path) -> Result<(), CertError> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let (tls_crt, tls_key) = (dir.join("tls.crt"), dir.join("tls.key"));
        write_atomic_all(&[
            (&ca_crt, self.ca.cert_pem.as_bytes(), 0o644),
            (&ca_key, self.ca.key_pem.as_bytes(), 0o600),
            (&tls_crt, self.server.cert_pem.as_bytes(), 0o644),
            (&tls_key, self.server.key_pem.as_bytes(), 0o600),
        ])?;
        Ok(())
    }
}

/// Five years, as the setup component issues its CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 86400);
/// 90 days (`2160h`), the reference server-certificate lifetime.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(2160 * 3600);

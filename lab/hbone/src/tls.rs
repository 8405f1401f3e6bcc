//! Mutual TLS 1.3 with SPIFFE identities, both ways, as ztunnel does it:
//! - the server (15008) requires a client certificate chained to the mesh CA that carries
//!   a `spiffe://<trust domain>/...` URI SAN;
//! - the client requires the server's certificate to chain to the mesh CA and to carry
//!   exactly the identity expected for the destination workload (no DNS name check: a
//!   workload certificate has none).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::{ServerCertVerified, ServerCertVerifier};
use rustls::server::{ClientCertVerified, ClientCertVerifier};
use rustls::{Certificate, ClientConfig, DistinguishedNames, PrivateKey, ServerConfig, ServerName};

static SIG_ALGS: &[&webpki::SignatureAlgorithm] = &[
    &webpki::ECDSA_P256_SHA256,
    &webpki::ECDSA_P384_SHA384,
    &webpki::ED25519,
    &webpki::RSA_PKCS1_2048_8192_SHA256,
    &webpki::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
];

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

pub struct Identity {
    pub certs: Vec<Certificate>,
    pub key: PrivateKey,
}

/// A PEM bundle: the leaf certificate (then any chain) and its PKCS#8 / EC / RSA key.
pub fn load_bundle(path: &Path) -> io::Result<Identity> {
    let pem = fs::read(path).map_err(|e| invalid(format!("{}: {}", path.display(), e)))?;
    let mut certs = Vec::new();
    let mut key = None;
    for item in rustls_pemfile::read_all(&mut pem.as_slice())? {
        match item {
            rustls_pemfile::Item::X509Certificate(der) => certs.push(Certificate(der)),
            rustls_pemfile::Item::PKCS8Key(der)
            | rustls_pemfile::Item::ECKey(der)
            | rustls_pemfile::Item::RSAKey(der) => key = Some(PrivateKey(der)),
            _ => {}
        }
    }
    match (certs.is_empty(), key) {
        (false, Some(key)) => Ok(Identity { certs, key }),
        _ => Err(invalid(format!("{}: needs a certificate and a key", path.display()))),
    }
}

pub fn load_ca(path: &Path) -> io::Result<Vec<u8>> {
    let pem = fs::read(path).map_err(|e| invalid(format!("{}: {}", path.display(), e)))?;
    for item in rustls_pemfile::read_all(&mut pem.as_slice())? {
        if let rustls_pemfile::Item::X509Certificate(der) = item {
            webpki::TrustAnchor::try_from_cert_der(&der)
                .map_err(|e| invalid(format!("{}: not a CA certificate: {:?}", path.display(), e)))?;
            return Ok(der);
        }
    }
    Err(invalid(format!("{}: no certificate", path.display())))
}

fn bad_cert(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificateData(why)
}

fn webpki_time(now: SystemTime) -> Result<webpki::Time, rustls::Error> {
    webpki::Time::try_from(now).map_err(|_| rustls::Error::FailedToGetCurrentTime)
}

struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>, // chain to the mesh CA, EKU clientAuth
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> Option<bool> {
        Some(true)
    }

    fn client_auth_root_subjects(&self) -> Option<DistinguishedNames> {
        self.inner.client_auth_root_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &Certificate,
        intermediates: &[Certificate],
        now: SystemTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let prefix = format!("spiffe://{}/", self.trust_domain);
        let ids = uri_sans(&end_entity.0);
        if ids.iter().any(|id| id.starts_with(&prefix)) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(bad_cert(format!("client has no {}* identity (URI SANs: {:?})", prefix, ids)))
        }
    }
}

struct SpiffeServerVerifier {
    ca: Arc<Vec<u8>>,
    expected: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &Certificate,
        intermediates: &[Certificate],
        _server_name: &ServerName,
        _scts: &mut dyn Iterator<Item = &[u8]>,
        _ocsp_response: &[u8],
        now: SystemTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = webpki::TrustAnchor::try_from_cert_der(&self.ca)
            .map_err(|e| bad_cert(format!("mesh CA: {:?}", e)))?;
        let cert = webpki::EndEntityCert::try_from(end_entity.0.as_slice())
            .map_err(|e| bad_cert(format!("server certificate: {:?}", e)))?;
        let chain: Vec<&[u8]> = intermediates.iter().map(|c| c.0.as_slice()).collect();
        cert.verify_is_valid_tls_server_cert(
            SIG_ALGS,
            &webpki::TlsServerTrustAnchors(&[anchor]),
            &chain,
            webpki_time(now)?,
        )
        .map_err(|e| bad_cert(format!("server certificate: {:?}", e)))?;
        let ids = uri_sans(&end_entity.0);
        if ids.iter().any(|id| *id == self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(bad_cert(format!(
                "server identity {:?} is not the destination's {}",
                ids, self.expected
            )))
        }
    }
}

fn h2_alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

pub fn server_config(
    id: &Identity,
    ca: &[u8],
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(&Certificate(ca.to_vec())).map_err(|e| format!("mesh CA: {:?}", e))?;
    let verifier = SpiffeClientVerifier {
        inner: rustls::server::AllowAnyAuthenticatedClient::new(roots),
        trust_domain: trust_domain.to_string(),
    };
    let mut cfg = ServerConfig::builder()
        .with_safe_default_cipher_suites()
        .with_safe_default_kx_groups()
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(id.certs.clone(), id.key.clone())
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = h2_alpn();
    Ok(Arc::new(cfg))
}

pub fn client_config(
    id: &Identity,
    ca: Arc<Vec<u8>>,
    expected: &str,
) -> Result<Arc<ClientConfig>, String> {
    let verifier = SpiffeServerVerifier { ca, expected: expected.to_string() };
    let mut cfg = ClientConfig::builder()
        .with_safe_default_cipher_suites()
        .with_safe_default_kx_groups()
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_single_cert(id.certs.clone(), id.key.clone())
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = h2_alpn();
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// The name rustls wants for a connection: the destination IP (sends no SNI).
pub fn server_name(ip: IpAddr) -> ServerName {
    ServerName::IpAddress(ip)
}

// ---- the URI SANs of a DER certificate (just enough DER to find them) ----

/// (tag, content, rest) of the first DER element of `input`.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    if end > input.len() {
        return None;
    }
    Some((tag, &input[start..end], &input[end..]))
}

fn der_items(mut input: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some((tag, content, rest)) = der(input) {
        out.push((tag, content));
        input = rest;
    }
    out
}

const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17

pub fn uri_sans(cert: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let tbs = match der(cert).and_then(|(_, c, _)| der(c)) {
        Some((0x30, tbs, _)) => tbs,
        _ => return out,
    };
    for (tag, exts) in der_items(tbs) {
        if tag != 0xa3 {
            continue; // extensions are [3] EXPLICIT
        }
        let list = match der(exts) {
            Some((0x30, list, _)) => list,
            _ => continue,
        };
        for (_, ext) in der_items(list) {
            let fields = der_items(ext);
            if fields.first() != Some(&(0x06, OID_SAN)) {
                continue;
            }
            if let Some((_, value)) = fields.iter().find(|(t, _)| *t == 0x04) {
                if let Some((0x30, names, _)) = der(value) {
                    for (t, name) in der_items(names) {
                        if t == 0x86 {
                            // [6] IMPLICIT IA5String: uniformResourceIdentifier
                            out.push(String::from_utf8_lossy(name).into_owned());
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_rejects_truncated_input() {
        assert!(der(&[0x30, 0x05, 0x01]).is_none());
        assert!(der(&[0x30, 0x85, 0, 0, 0, 0, 1]).is_none());
        assert!(uri_sans(&[0x30, 0x03, 0x30, 0x01]).is_empty());
    }
}

//! The private certificate authority of an HTTPS test server ([`super::Options::tls`]): a
//! CA made for one test, the server certificate it signs, and the TLS acceptor the server
//! answers with. Apart from the server because only HTTPS tests need it, and its certificate
//! work (rcgen, rustls) has nothing to do with serving S3.

use std::sync::Arc;

/// A private certificate authority made for one test, and a certificate it signed for
/// `127.0.0.1` and `localhost`.
#[derive(Clone)]
pub struct PrivateCa {
    /// The CA's certificate (PEM): what a client must trust.
    pub ca_pem: String,
    /// The server's certificate (PEM), signed by the CA.
    pub cert_pem: String,
    /// The server's private key (PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for PrivateCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateCa")
    }
}

impl PrivateCa {
    /// A new CA (a new key each time: no `Default`, which would hide that), and a
    /// certificate for `127.0.0.1` and `localhost`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> PrivateCa {
        PrivateCa::for_names(&["127.0.0.1", "localhost"])
    }

    /// A CA and a server certificate for `names` (host names, `*.` wildcards, addresses).
    pub fn for_names(names: &[&str]) -> PrivateCa {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "walsync test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        PrivateCa {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

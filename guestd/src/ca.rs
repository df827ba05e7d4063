//! The per-boot certificate authority that lets the proxy terminate TLS inside the guest, so the PEP sees
//! (and decides, brokers and audits) each HTTPS request whole. The CA's private key is generated at start
//! and lives only in this process's memory; its certificate is written as PEM for the guest's programs to
//! trust. Leaf certificates are issued per host name on first use and cached.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio_rustls::rustls;

pub struct Authority {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    configs: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

/// Leaf configurations kept; beyond this the cache starts over (issuing one costs ~1 ms).
const CACHE: usize = 1024;

impl Authority {
    pub fn generate() -> Result<Authority, String> {
        let key = rcgen::KeyPair::generate().map_err(|err| format!("CA key: {err}"))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|err| format!("CA parameters: {err}"))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pexi guest proxy CA (this boot)");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key)
            .map_err(|err| format!("CA certificate: {err}"))?;
        Ok(Authority {
            issuer,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// Writes the CA certificate (public) to `path`, creating its folder.
    pub fn write_certificate(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.issuer.pem())
    }

    /// A TLS server configuration presenting a certificate for `name` (a DNS name or an IP address).
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = configs.get(name) {
            return Ok(config.clone());
        }
        let key = rcgen::KeyPair::generate().map_err(|err| format!("leaf key: {err}"))?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
            .map_err(|err| format!("certificate for {name}: {err}"))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|err| format!("certificate for {name}: {err}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("TLS versions: {err}"))?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .map_err(|err| format!("TLS configuration for {name}: {err}"))?;
        // HTTP/1.1 only: every request inside becomes one pep.http.request.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if configs.len() >= CACHE {
            configs.clear();
        }
        configs.insert(name.to_string(), config.clone());
        Ok(config)
    }
}

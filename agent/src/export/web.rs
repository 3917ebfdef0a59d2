//! The endpoint's TLS and authentication, from a web configuration file in the manner of
//! node_exporter's (Prometheus exporter-toolkit's keys, in TOML): `[tls_server_config]` with
//! `cert_file`, `key_file` and, to require client certificates signed by it, `client_ca_file`;
//! `[basic_auth_users]`, user names to bcrypt hashes; `bearer_token_file`. `/healthz` and
//! `/readyz` stay open to unauthenticated clients (the kubelet's probes), over TLS too.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::{Context, Result, bail};
use axum::http::{HeaderMap, header};
use base64::Engine;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio_rustls::TlsAcceptor;

/// The file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    bearer_token_file: Option<PathBuf>,
    tls_server_config: Option<TlsFiles>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

// The keys are exporter-toolkit's, so that its users find them.
#[allow(clippy::struct_field_names)]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

/// TLS and authentication of the endpoint, loaded and checked at start.
pub struct WebConfig {
    pub tls: Option<Tls>,
    pub auth: Auth,
}

impl WebConfig {
    /// Plain HTTP, open to every client that can reach the address.
    pub fn open() -> Self {
        Self {
            tls: None,
            auth: Auth::default(),
        }
    }

    /// What the endpoint asks of its clients, for the start-up line.
    pub fn describe(&self) -> String {
        let mut asks = Vec::new();
        if self
            .tls
            .as_ref()
            .is_some_and(Tls::requires_client_certificates)
        {
            asks.push("client certificates");
        }
        if !self.auth.users.is_empty() {
            asks.push("basic auth");
        }
        if self.auth.bearer_token.is_some() {
            asks.push("a bearer token");
        }
        if asks.is_empty() {
            String::new()
        } else {
            format!(" (requires {}; /healthz and /readyz open)", asks.join(", "))
        }
    }

    /// Reads `path` and everything it names; an error names the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read the web configuration {}", path.display()))?;
        let file: WebConfigFile = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "web configuration {}: {}",
                path.display(),
                e.message().trim()
            )
        })?;
        let tls = file.tls_server_config.map(Tls::load).transpose()?;
        let bearer_token = match &file.bearer_token_file {
            Some(token_file) => {
                let token = fs::read_to_string(token_file).with_context(|| {
                    format!("cannot read bearer_token_file {}", token_file.display())
                })?;
                let token = token.trim().to_owned();
                if token.is_empty() {
                    bail!("bearer_token_file {} is empty", token_file.display());
                }
                Some(token)
            }
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                anyhow::anyhow!(
                    "web configuration {}: basic_auth_users.{user} is not a bcrypt hash ({e})",
                    path.display()
                )
            })?;
        }
        Ok(Self {
            tls,
            auth: Auth {
                users: file.basic_auth_users,
                bearer_token,
            },
        })
    }
}

/// The server's certificate and key (re-read when their files change, so that a rotated
/// certificate is served without a restart), and the client authority if clients must present
/// certificates.
pub struct Tls {
    files: TlsFiles,
    current: Mutex<(Option<SystemTime>, TlsAcceptor)>,
}

impl Tls {
    fn load(files: TlsFiles) -> Result<Self> {
        let acceptor = acceptor(&files)?;
        let stamp = stamp(&files);
        Ok(Self {
            files,
            current: Mutex::new((stamp, acceptor)),
        })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// The acceptor for a new connection: re-made if the files changed since; if they cannot be
    /// read now (a rotation half done), the previous one, with a warning.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.files);
        if now != current.0 {
            match acceptor(&self.files) {
                Ok(fresh) => *current = (now, fresh),
                Err(e) => tracing::warn!("keeping the previous TLS certificate: {e:#}"),
            }
        }
        current.1.clone()
    }
}

/// The latest modification of the TLS files, to notice a rotation.
fn stamp(files: &TlsFiles) -> Option<SystemTime> {
    [
        Some(&files.cert_file),
        Some(&files.key_file),
        files.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|f| fs::metadata(f).and_then(|m| m.modified()).ok())
    .max()
}

fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor> {
    let certificates: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&files.cert_file)
            .and_then(Iterator::collect)
            .with_context(|| format!("cert_file {}", files.cert_file.display()))?;
    if certificates.is_empty() {
        bail!(
            "cert_file {} holds no certificate",
            files.cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .with_context(|| format!("key_file {}", files.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(ca_file)
                .with_context(|| format!("client_ca_file {}", ca_file.display()))?
            {
                roots
                    .add(ca.with_context(|| format!("client_ca_file {}", ca_file.display()))?)
                    .with_context(|| format!("client_ca_file {}", ca_file.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("client_ca_file {}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates, key)
        .with_context(|| {
            format!(
                "key_file {} does not match cert_file {}",
                files.key_file.display(),
                files.cert_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Who may read `/metrics` and `/api/timeline`: anyone when neither users nor a token are set.
#[derive(Debug, Default)]
pub struct Auth {
    users: BTreeMap<String, String>,
    bearer_token: Option<String>,
}

impl Auth {
    pub fn is_open(&self) -> bool {
        self.users.is_empty() && self.bearer_token.is_none()
    }

    /// Whether a request with these headers may read the figures. A bcrypt check costs tens of
    /// milliseconds; at most `MAX_RESPONSES_IN_PROGRESS` run at once, as they run inside that
    /// limit.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.bearer_token.as_ref().is_some_and(|token| {
                bool::from(token.as_bytes().ct_eq(credentials.trim().as_bytes()))
            });
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials.trim())
        else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        self.users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false))
    }

    /// The challenge of a 401.
    pub fn challenge(&self) -> &'static str {
        if self.users.is_empty() {
            "Bearer"
        } else {
            "Basic realm=\"vmtrace\""
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn basic_users_and_a_bearer_token_are_checked() {
        let auth = Auth {
            users: [("prometheus".to_owned(), bcrypt::hash("s3cret", 4).unwrap())].into(),
            bearer_token: Some("token-1".to_owned()),
        };
        let basic = |user_password: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(user_password)
            )
        };
        assert!(auth.admits(&headers(&basic("prometheus:s3cret"))));
        assert!(!auth.admits(&headers(&basic("prometheus:wrong"))));
        assert!(!auth.admits(&headers(&basic("nobody:s3cret"))));
        assert!(auth.admits(&headers("Bearer token-1")));
        assert!(!auth.admits(&headers("Bearer token-2")));
        assert!(!auth.admits(&headers("Digest x")));
        assert!(!auth.admits(&HeaderMap::new()));
        assert!(Auth::default().admits(&HeaderMap::new()));
    }

    #[test]
    fn a_bad_file_says_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("vmtrace-web-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.toml");
        for (text, expected) in [
            (
                "[basic_auth_users]\nalice = \"plain\"\n",
                "not a bcrypt hash",
            ),
            (
                "[tls_server_config]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/k\"\n",
                "cert_file /nonexistent.crt",
            ),
            ("tls = 1\n", "unknown field"),
            (
                "bearer_token_file = \"/nonexistent\"\n",
                "cannot read bearer_token_file",
            ),
        ] {
            fs::write(&path, text).unwrap();
            let error = format!("{:#}", WebConfig::load(&path).err().expect(text));
            assert!(error.contains(expected), "{text}: {error}");
        }
        fs::remove_dir_all(dir).unwrap();
    }
}

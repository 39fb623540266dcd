//! How both ends of the control plane open it: TLS material from files, the client endpoint every
//! caller (worker, `butler status`) builds the same way, and the translation of transport failures
//! — which tonic reports as a bare "transport error" — into sentences that name the cause.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The coordinator's TLS: its certificate chain and key, and for mTLS the CA that signs clients.
#[derive(Clone)]
pub struct ServerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl ServerTls {
    /// Reads PEM files; a missing or non-PEM file is an error naming it.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, String> {
        Ok(ServerTls {
            cert: read_pem(cert, "the coordinator's certificate (--tls-cert)")?,
            key: read_pem(key, "the coordinator's private key (--tls-key)")?,
            client_ca: client_ca
                .map(|p| read_pem(p, "the client CA (--tls-client-ca)"))
                .transpose()?,
        })
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    pub fn config(&self) -> ServerTlsConfig {
        let c = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        match &self.client_ca {
            Some(ca) => c.client_ca_root(Certificate::from_pem(ca)),
            None => c,
        }
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual())
            .finish_non_exhaustive()
    }
}

/// Where a client's TLS material lies (command-line flags).
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// The CA that signed the coordinator's certificate (`--tls-ca`).
    pub ca: Option<PathBuf>,
    /// This client's certificate and key, for a coordinator that requires mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to check the coordinator's certificate against, when the URL's host is not in it.
    pub domain: Option<String>,
}

/// A client's TLS, loaded.
#[derive(Clone)]
pub struct ClientTls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ClientTlsFiles {
    /// `None` when no TLS flag is set (plaintext); an error when the flags do not make sense
    /// together (a key without a certificate, a certificate without a CA).
    pub fn load(&self) -> Result<Option<ClientTls>, String> {
        let any =
            self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some();
        if !any {
            return Ok(None);
        }
        let ca = self.ca.as_deref().ok_or(
            "TLS options need --tls-ca: the CA certificate that signed the coordinator's certificate",
        )?;
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((
                read_pem(c, "this client's certificate (--tls-cert)")?,
                read_pem(k, "this client's private key (--tls-key)")?,
            )),
            (None, None) => None,
            (Some(_), None) => {
                return Err("--tls-cert needs --tls-key (the certificate's private key)".into())
            }
            (None, Some(_)) => {
                return Err("--tls-key needs --tls-cert (the client certificate)".into())
            }
        };
        Ok(Some(ClientTls {
            ca: read_pem(ca, "the coordinator's CA certificate (--tls-ca)")?,
            identity,
            domain: self.domain.clone(),
        }))
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read {what} at {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!(
            "{what} at {} is not PEM (no \"-----BEGIN\" line)",
            path.display()
        ));
    }
    Ok(bytes)
}

/// The endpoint for `url` with TLS when `tls` is set. TLS needs an `https://` URL and plaintext an
/// `http://` one: a mismatch is refused here, before any connection, with the fix.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let https = url.starts_with("https://");
    match (tls, https) {
        (Some(_), false) => {
            return Err(format!(
                "TLS is configured (--tls-ca) but the coordinator URL {url:?} is not https://"
            ))
        }
        (None, true) => {
            return Err(format!(
                "the coordinator URL {url:?} is https:// but no TLS is configured: pass --tls-ca \
                 with the CA certificate that signed the coordinator's certificate"
            ))
        }
        _ => {}
    }
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad coordinator URL {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    let Some(tls) = tls else { return Ok(ep) };
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
    if let Some((cert, key)) = &tls.identity {
        c = c.identity(Identity::from_pem(cert, key));
    }
    if let Some(d) = &tls.domain {
        c = c.domain_name(d.clone());
    }
    ep.tls_config(c)
        .map_err(|e| format!("TLS configuration for {url}: {}", chain(&e)))
}

/// An error and its sources, joined by ": ".
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// What a failed connection or call to the coordinator means, when the transport says why: `None`
/// when the error is not a transport failure this knows (the caller keeps its own message).
/// `tls` is whether this client used TLS.
pub fn explain(e: &(dyn StdError + 'static), tls: bool) -> Option<String> {
    let text = chain(e);
    let has = |s: &str| text.contains(s);
    let why = if has("certificate expired") {
        if has("invalid peer certificate") {
            "the coordinator's TLS certificate has expired".to_string()
        } else {
            "the coordinator refused this client's certificate: it has expired".to_string()
        }
    } else if has("received fatal alert: CertificateExpired") {
        "the coordinator refused this client's certificate: it has expired".to_string()
    } else if has("certificate not valid yet") {
        "the coordinator's TLS certificate is not valid yet (check the clocks)".to_string()
    } else if has("UnknownIssuer") {
        "the coordinator's TLS certificate is not signed by the CA given with --tls-ca (wrong CA)"
            .to_string()
    } else if has("received fatal alert: UnknownCA") || has("received fatal alert: BadCertificate")
    {
        "the coordinator refused this client's certificate: it is not signed by the coordinator's \
         client CA (--tls-client-ca)"
            .to_string()
    } else if has("received fatal alert: CertificateRequired")
        || (tls && has("received fatal alert: HandshakeFailure"))
    {
        "the coordinator requires a client certificate (mutual TLS): pass --tls-cert and --tls-key"
            .to_string()
    } else if has("certificate not valid for name") {
        format!(
            "the coordinator's TLS certificate does not name the host in the URL ({}); pass \
             --tls-domain with a name it holds",
            text.split("certificate not valid for name")
                .nth(1)
                .unwrap_or("")
                .trim()
        )
    } else if tls && (has("InvalidContentType") || has("corrupt message") || has("CorruptMessage"))
    {
        "the coordinator does not speak TLS: use an http:// URL without --tls-ca, or start the \
         coordinator with --tls-cert/--tls-key"
            .to_string()
    } else if !tls
        && (has("connection reset")
            || has("Connection reset")
            || has("connection closed")
            || has("broken pipe")
            || has("frame with invalid size")
            || has("unexpected end of file")
            || has("unexpected EOF"))
    {
        "the coordinator closed a plaintext connection: it probably requires TLS (use an https:// \
         URL with --tls-ca)"
            .to_string()
    } else {
        return None;
    };
    Some(format!("{why} [{text}]"))
}

/// A tonic status from a call, explained like [`explain`] when it is a transport failure. Under
/// mutual TLS the coordinator refuses a client certificate only after the client has finished its
/// side of the handshake, so the first call may see no more than "connection closed"; then a
/// direct handshake ([`probe_tls`]) asks again, and reads the coordinator's alert.
pub async fn explain_status(s: &tonic::Status, url: &str, tls: Option<&ClientTls>) -> String {
    if let Some(why) = explain(s, tls.is_some()) {
        return why;
    }
    if s.code() == tonic::Code::Unauthenticated {
        return format!("{} (check the job token)", s.message());
    }
    let transport = matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    ) && chain(s).contains("transport error");
    if let (true, Some(t)) = (transport, tls) {
        if let Some(why) = probe_tls(url, t)
            .await
            .and_then(|e| explain(&Text(e), true))
        {
            return why;
        }
    }
    format!("{} ({})", s.message(), chain(s))
}

#[derive(Debug)]
struct Text(String);

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Text {}

/// Opens one TLS connection to the coordinator as `tls` configures it, sends the HTTP/2 preface and
/// waits up to 3 s for an answer: `Some(error)` when the handshake fails or the coordinator answers
/// with an alert, `None` when it accepts the connection (or cannot be reached at all).
pub async fn probe_tls(url: &str, tls: &ClientTls) -> Option<String> {
    use pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{self, pki_types};
    let uri: tonic::codegen::http::Uri = url.parse().ok()?;
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for c in pki_types::CertificateDer::pem_slice_iter(&tls.ca) {
        roots.add(c.ok()?).ok()?;
    }
    // The ring provider, as tonic's `tls-ring` uses (deprecated in rustls 0.23.48 for lacking
    // post-quantum key exchange, which a diagnostic handshake does not need).
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let certs = pki_types::CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = pki_types::PrivateKeyDer::from_pem_slice(key).ok()?;
            builder.with_client_auth_cert(certs, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = pki_types::ServerName::try_from(tls.domain.clone().unwrap_or(host.clone())).ok()?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .ok()?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let mut s = match connector.connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => return Some(chain(&e)),
        };
        // The HTTP/2 client preface and an empty SETTINGS frame: a server that accepted the
        // certificate answers with its SETTINGS, one that refused it with an alert.
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        if let Err(e) = s.write_all(&hello).await {
            return Some(chain(&e));
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf).await {
            Ok(0) => Some("connection closed".into()),
            Ok(_) => None,
            Err(e) => Some(chain(&e)),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for E {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn err(outer: &'static str, inner: &'static str) -> E {
        E(outer, Some(Box::new(E(inner, None))))
    }

    #[test]
    fn chains_join_sources_once() {
        let e = err("transport error", "invalid peer certificate: UnknownIssuer");
        assert_eq!(
            chain(&e),
            "transport error: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn known_failures_name_their_cause() {
        let cases = [
            ("invalid peer certificate: UnknownIssuer", true, "wrong CA"),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX)",
                true,
                "coordinator's TLS certificate has expired",
            ),
            (
                "received fatal alert: CertificateRequired",
                true,
                "requires a client certificate",
            ),
            (
                "received fatal alert: CertificateExpired",
                true,
                "client's certificate: it has expired",
            ),
            (
                "received fatal alert: UnknownCA",
                true,
                "not signed by the coordinator's client CA",
            ),
            (
                "received corrupt message of type InvalidContentType",
                true,
                "does not speak TLS",
            ),
            (
                "connection closed before message completed",
                false,
                "probably requires TLS",
            ),
        ];
        for (inner, tls, want) in cases {
            let got = explain(&err("transport error", inner), tls).expect(inner);
            assert!(got.contains(want), "{inner}: {got}");
            assert!(got.contains(inner), "the raw cause is kept: {got}");
        }
        assert_eq!(explain(&err("transport error", "dns error"), false), None);
    }

    #[test]
    fn url_scheme_must_match_tls() {
        let tls = ClientTls {
            ca: Vec::new(),
            identity: None,
            domain: None,
        };
        let e = endpoint("http://127.0.0.1:1", Some(&tls)).unwrap_err();
        assert!(e.contains("not https://"), "{e}");
        let e = endpoint("https://127.0.0.1:1", None).unwrap_err();
        assert!(e.contains("--tls-ca"), "{e}");
        assert!(endpoint("http://127.0.0.1:1", None).is_ok());
    }

    #[test]
    fn client_flags_must_go_together() {
        assert!(ClientTlsFiles::default().load().unwrap().is_none());
        let no_ca = ClientTlsFiles {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..Default::default()
        };
        assert!(no_ca.load().unwrap_err().contains("--tls-ca"));
        let dir = std::env::temp_dir().join(format!("butler-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let key_only = ClientTlsFiles {
            ca: Some(ca.clone()),
            key: Some(ca.clone()),
            ..Default::default()
        };
        assert!(key_only
            .load()
            .unwrap_err()
            .contains("--tls-key needs --tls-cert"));
        let not_pem = dir.join("x.der");
        std::fs::write(&not_pem, [0x30, 0x82]).unwrap();
        let e = ClientTlsFiles {
            ca: Some(not_pem),
            ..Default::default()
        }
        .load()
        .unwrap_err();
        assert!(e.contains("is not PEM"), "{e}");
        let e = ClientTlsFiles {
            ca: Some(dir.join("missing.pem")),
            ..Default::default()
        }
        .load()
        .unwrap_err();
        assert!(
            e.contains("cannot read the coordinator's CA certificate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

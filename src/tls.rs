//! Certificates for a run: `butler run --tls` and `butler tls generate` make a private CA, a
//! coordinator certificate for the given hosts and a client certificate for the workers, all signed
//! by that CA, as PEM files only the owner can read.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Directory for ca.pem, coordinator.pem/.key and client.pem/.key (created 0700).
    #[arg(long)]
    pub out: PathBuf,
    /// Names and addresses the coordinator is reached at (its certificate's subjectAltNames),
    /// e.g. a Kubernetes service name; repeatable.
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub hosts: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
}

#[derive(clap::Subcommand)]
pub enum TlsCommand {
    /// Make a CA, a coordinator certificate and a client certificate (for --tls-* flags).
    Generate(GenerateArgs),
}

pub fn run(cmd: TlsCommand) -> Result<()> {
    match cmd {
        TlsCommand::Generate(a) => {
            let files = generate(&a.out, &a.hosts, a.days)?;
            println!(
                "coordinator: --tls-cert {} --tls-key {} --tls-client-ca {}",
                files.coordinator_cert.display(),
                files.coordinator_key.display(),
                files.ca.display()
            );
            println!(
                "workers and butler status: --tls-ca {} --tls-cert {} --tls-key {}",
                files.ca.display(),
                files.client_cert.display(),
                files.client_key.display()
            );
            Ok(())
        }
    }
}

/// The files [`generate`] wrote.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub coordinator_cert: PathBuf,
    pub coordinator_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Writes a fresh CA and the coordinator's and clients' certificates into `dir`.
pub fn generate(dir: &Path, hosts: &[String], days: u32) -> Result<TlsFiles> {
    butler_common::fsutil::create_private_dir(dir)?;
    let now = time_now();
    let until = now + std::time::Duration::from_secs(u64::from(days.max(1)) * 86_400);
    let validity = |p: &mut CertificateParams| {
        // A little slack for clocks a few minutes apart.
        p.not_before = now - std::time::Duration::from_secs(300);
        p.not_after = until;
    };

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "butler run CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |names: Vec<String>,
                cn: &str,
                usage: ExtendedKeyUsagePurpose|
     -> Result<(String, String)> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut p = CertificateParams::new(names).context("certificate parameters")?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p);
        let cert = p
            .signed_by(&key, &issuer)
            .context("signing a certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        hosts.to_vec(),
        "butler coordinator",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_pem, client_key) = leaf(
        vec!["butler-worker".to_string()],
        "butler worker",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        coordinator_cert: dir.join("coordinator.pem"),
        coordinator_key: dir.join("coordinator.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    for (path, text) in [
        (&files.ca, ca_cert.pem()),
        (&files.coordinator_cert, server_pem),
        (&files.coordinator_key, server_key),
        (&files.client_cert, client_pem),
        (&files.client_key, client_key),
    ] {
        butler_common::fsutil::write_private(path, text.as_bytes())?;
    }
    Ok(files)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

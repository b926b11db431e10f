//! A small certificate authority for installs without a PKI (`seactl certs`): one CA,
//! a server certificate for the control plane (its HTTP API and ADS), and one client
//! certificate per Envoy, whose subject common name (and DNS name) is the Envoy's
//! node id (the control plane's `identity` reads it back).
//!
//! Keys are ECDSA P-256, written as PKCS#8 PEM. Every file is written with mode 0600
//! and never replaced unless asked (`force`): replacing the CA's key, or an Envoy's,
//! silently would cut off every Envoy that still holds the old one.
//!
//! Layout of a directory: `ca.crt`, `ca.key`, then `NAME.crt` and `NAME.key` per
//! server certificate and per node id.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name in a directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file name in a directory.
pub const CA_KEY: &str = "ca.key";
/// The CA's validity by default, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// A server or client certificate's validity by default, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 825;
/// The longest common name X.509 allows (RFC 5280, `ub-common-name`).
const MAX_COMMON_NAME: usize = 64;

/// A certificate that could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(
        "{0} exists: not overwriting it (pass --force to replace it; whatever uses the old \
         one stops working)"
    )]
    Exists(PathBuf),
    #[error("no CA in {dir}: run `seactl certs init --dir {dir}` first ({missing} is missing)")]
    NoCa { missing: PathBuf, dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
}

/// Files written, with what each holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The end of the certificate's validity (RFC 3339).
    pub not_after: String,
}

/// Creates the CA (`ca.crt`, `ca.key`) in `dir` (created with mode 0700 if missing).
/// Without a name, `seashard CA` and a random suffix: two CAs made this way never
/// share a name, so a certificate of the other is refused as of an unknown issuer.
pub fn init(
    dir: &Path,
    common_name: Option<&str>,
    days: u32,
    force: bool,
) -> Result<Written, CertsError> {
    let common_name = match common_name {
        Some(n) => n.to_owned(),
        None => {
            let mut suffix = [0u8; 4];
            ring_random(&mut suffix)?;
            let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
            format!("seashard CA {hex}")
        }
    };
    let common_name = common_name.as_str();
    check_name("the CA's name", common_name)?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert, &key], force)?;
    let mut params = base_params(common_name, days)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key_pair = new_key()?;
    let ca = params
        .self_signed(&key_pair)
        .map_err(rcgen_err("signing the CA certificate"))?;
    create_dir(dir)?;
    write_pair(&cert, &ca.pem(), &key, &key_pair.serialize_pem(), force)?;
    Ok(Written {
        cert,
        key,
        not_after: rfc3339(params.not_after),
    })
}

/// A server certificate `NAME.crt`/`NAME.key` for the control plane, valid for every
/// name and address in `sans` (a name gives a DNS entry, an address an IP entry).
pub fn server(
    dir: &Path,
    name: &str,
    sans: &[String],
    days: u32,
    force: bool,
) -> Result<Written, CertsError> {
    check_file_name("the server certificate's name", name)?;
    if sans.is_empty() {
        return Err(CertsError::Invalid(
            "a server certificate needs at least one --san: each name or address Envoys and \
             seactl use to reach the control plane (e.g. --san cp.example --san 10.0.0.5)"
                .into(),
        ));
    }
    let mut params = base_params(name, days)?;
    params.subject_alt_names = sans.iter().map(|s| san_of(s)).collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(dir, name, params, force)
}

/// A client certificate `NODE_ID.crt`/`NODE_ID.key` for one Envoy: the subject's
/// common name is the node id, and so is its DNS name. Only a client (its extended
/// key usage): it cannot serve as the control plane's certificate.
pub fn client(dir: &Path, node_id: &str, days: u32, force: bool) -> Result<Written, CertsError> {
    check_file_name("the node id", node_id)?;
    let mut params = base_params(node_id, days)?;
    params.subject_alt_names = vec![SanType::DnsName(node_id.try_into().map_err(|e| {
        CertsError::Invalid(format!("the node id `{node_id}` as a DNS name: {e}"))
    })?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, node_id, params, force)
}

/// Signs `params` with the CA of `dir` and writes `NAME.crt`/`NAME.key`.
fn issue(
    dir: &Path,
    name: &str,
    mut params: CertificateParams,
    force: bool,
) -> Result<Written, CertsError> {
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for f in [&ca_cert, &ca_key] {
        if !f.exists() {
            return Err(CertsError::NoCa {
                missing: f.clone(),
                dir: dir.to_owned(),
            });
        }
    }
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    refuse_existing(&[&cert, &key], force)?;
    let ca_key_pair =
        KeyPair::from_pem(&read(&ca_key)?).map_err(rcgen_err(&format!("{}", ca_key.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key_pair)
        .map_err(rcgen_err(&format!("{}", ca_cert.display())))?;
    params.use_authority_key_identifier_extension = true;
    let key_pair = new_key()?;
    let signed = params
        .signed_by(&key_pair, &issuer)
        .map_err(rcgen_err(&format!("signing {}", cert.display())))?;
    write_pair(&cert, &signed.pem(), &key, &key_pair.serialize_pem(), force)?;
    Ok(Written {
        cert,
        key,
        not_after: rfc3339(params.not_after),
    })
}

/// Subject `CN=common_name`, valid from an hour ago (clocks differ) for `days`.
fn base_params(common_name: &str, days: u32) -> Result<CertificateParams, CertsError> {
    if days == 0 {
        return Err(CertsError::Invalid("--days must be at least 1".into()));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    // A random serial: two certificates of one name never share one.
    let mut serial = [0u8; 16];
    ring_random(&mut serial)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
    Ok(params)
}

fn ring_random(buf: &mut [u8]) -> Result<(), CertsError> {
    use rustls::crypto::ring::default_provider;
    default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| CertsError::Invalid("no randomness for a serial number".into()))
}

fn new_key() -> Result<KeyPair, CertsError> {
    KeyPair::generate().map_err(rcgen_err("generating a key"))
}

fn san_of(s: &str) -> Result<SanType, CertsError> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    if !valid {
        return Err(CertsError::Invalid(format!(
            "--san `{s}` is neither an IP address nor a DNS name"
        )));
    }
    Ok(SanType::DnsName(s.try_into().map_err(|e| {
        CertsError::Invalid(format!("--san `{s}`: {e}"))
    })?))
}

/// A name that becomes a file name and a common name: `[A-Za-z0-9._-]`, 1 to 64
/// characters, not starting with `.` or `-`.
fn check_file_name(what: &str, name: &str) -> Result<(), CertsError> {
    check_name(what, name)?;
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with(['.', '-'])
        && name != "ca";
    if ok {
        Ok(())
    } else {
        Err(CertsError::Invalid(format!(
            "{what} `{name}` must be letters, digits, `.`, `_` and `-` (it names the files), \
             not start with `.` or `-`, and not be `ca`"
        )))
    }
}

fn check_name(what: &str, name: &str) -> Result<(), CertsError> {
    if name.trim().is_empty() {
        return Err(CertsError::Invalid(format!("{what} is empty")));
    }
    if name.len() > MAX_COMMON_NAME {
        return Err(CertsError::Invalid(format!(
            "{what} `{name}` is longer than {MAX_COMMON_NAME} characters, the most a \
             certificate's common name may hold"
        )));
    }
    Ok(())
}

fn refuse_existing(files: &[&Path], force: bool) -> Result<(), CertsError> {
    if force {
        return Ok(());
    }
    match files.iter().find(|f| f.exists() || f.is_symlink()) {
        Some(f) => Err(CertsError::Exists(f.to_path_buf())),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertsError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Writes the key, then the certificate, each with mode 0600.
fn write_pair(
    cert: &Path,
    cert_pem: &str,
    key: &Path,
    key_pem: &str,
    force: bool,
) -> Result<(), CertsError> {
    write_private(key, key_pem, force)?;
    write_private(cert, cert_pem, force)
}

/// Writes `text` to `path` with mode 0600: a new file (refused if one exists), or,
/// with `force`, one that replaces it (written beside it, then renamed over it).
fn write_private(path: &Path, text: &str, force: bool) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_owned(),
        source,
    };
    let target = if force {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(".{name}.new"))
    } else {
        path.to_owned()
    };
    if force && target.exists() {
        std::fs::remove_file(&target).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CertsError::Exists(path.to_owned()),
            _ => io(e),
        })?;
    // The umask may have taken bits away, never added them; be exact anyway.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    if force {
        std::fs::rename(&target, path).map_err(io)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> CertsError + '_ {
    move |source| CertsError::Rcgen {
        what: what.to_owned(),
        source,
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn a_ca_signs_servers_and_clients_files_are_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("tls");
        let ca = init(&d, Some("seashard test CA"), 30, false).unwrap();
        assert_eq!(mode(&d), 0o700);
        let s = server(
            &d,
            "control-plane",
            &["127.0.0.1".into(), "cp.example".into()],
            30,
            false,
        )
        .unwrap();
        let c = client(&d, "edge-1", 30, false).unwrap();
        for f in [&ca.cert, &ca.key, &s.cert, &s.key, &c.cert, &c.key] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        let key = std::fs::read_to_string(&c.key).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");

        // The client certificate names its node id: as CN and as DNS name.
        let pem = std::fs::read(&c.cert).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(cn, ["edge-1"]);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"edge-1\")]"
        );

        // Never overwritten silently, with or without the other file of the pair.
        let before = std::fs::read(&ca.key).unwrap();
        let err = init(&d, None, 30, false).unwrap_err();
        assert!(
            matches!(err, CertsError::Exists(ref p) if p == &ca.cert),
            "{err}"
        );
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read(&ca.key).unwrap(), before);
        std::fs::remove_file(&c.cert).unwrap();
        let err = client(&d, "edge-1", 30, false).unwrap_err();
        assert!(
            matches!(err, CertsError::Exists(ref p) if p == &c.key),
            "{err}"
        );

        // --force replaces, and the new file is private too.
        std::fs::set_permissions(&s.cert, std::fs::Permissions::from_mode(0o644)).unwrap();
        let old = std::fs::read(&s.cert).unwrap();
        server(&d, "control-plane", &["cp.example".into()], 30, true).unwrap();
        assert_ne!(std::fs::read(&s.cert).unwrap(), old);
        assert_eq!(mode(&s.cert), 0o600);
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "no temporary file left: {names:?}"
        );
    }

    #[test]
    fn refuses_bad_names_and_a_missing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let err = client(dir.path(), "edge-1", 30, false).unwrap_err();
        assert!(err.to_string().contains("seactl certs init"), "{err}");
        init(dir.path(), None, 30, false).unwrap();
        for bad in ["", "../x", "a/b", "ca", "-x", &"a".repeat(65)] {
            assert!(client(dir.path(), bad, 30, false).is_err(), "{bad:?}");
        }
        let err = server(dir.path(), "cp", &[], 30, false).unwrap_err();
        assert!(err.to_string().contains("--san"), "{err}");
        let err = server(dir.path(), "cp", &["not a name".into()], 30, false).unwrap_err();
        assert!(err.to_string().contains("not a name"), "{err}");
        assert!(init(&dir.path().join("x"), None, 0, false).is_err());
    }
}

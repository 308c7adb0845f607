//! Certificates made with rcgen, so a first run needs no openssl.
//!
//! `certs init` writes a CA (`ca.pem`, `ca.key`) and the destination's server certificate
//! (`dest.pem`, `dest.key`); `certs issue` writes a source's client certificate
//! (`NAME.pem`, `NAME.key`) signed by that CA, whose common name is the source's identity.
//! Private keys are written with mode 0600 and never overwritten.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

use crate::error::CertError;

/// The DNS name in the destination certificate that sources verify.
pub const DEST_SERVER_NAME: &str = "nvmirror-dest";

/// Longest source name (1 + 62 characters).
pub const MAX_NAME_LEN: usize = 47;

/// Check a source name: `[A-Za-z0-9][A-Za-z0-9._-]{0,46}`.
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let bad = || CertError::BadName {
        name: name.to_string(),
    };
    let bytes = name.as_bytes();
    let first_ok = bytes.first().is_some_and(|b| b.is_ascii_alphanumeric());
    if !first_ok || bytes.len() > MAX_NAME_LEN {
        return Err(bad());
    }
    if bytes[1..]
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Ok(())
    } else {
        Err(bad())
    }
}

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Rcgen { what, source }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a new file (never overwriting) with `mode`.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(path)(e)
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn refuse_existing(path: &Path) -> Result<(), CertError> {
    if path.exists() {
        return Err(CertError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "nvmirror");
    dn
}

fn san_of(s: &str) -> Result<SanType, CertError> {
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(
            s.to_string()
                .try_into()
                .map_err(|_| CertError::BadSan(s.to_string()))?,
        )),
    }
}

/// Days a source's certificate is valid by default (`certs issue`, `certs renew`).
pub const DEFAULT_SOURCE_DAYS: u32 = 365;
/// Days the destination's certificate is valid.
pub const DEST_DAYS: u32 = 825;
/// Days the CA is valid.
pub const CA_DAYS: u32 = 3650;

/// The certificate revocation list `certs revoke` writes and `fs-dest serve` enforces.
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join("ca.crl")
}

/// The revoked certificates, as `certs revoke` keeps them (the CRL is rebuilt from it).
fn revoked_path(dir: &Path) -> PathBuf {
    dir.join("revoked.json")
}

/// One revoked certificate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Revoked {
    /// The source it was issued to.
    name: String,
    /// Its serial number, hex.
    serial: String,
    /// When it was revoked (Unix seconds).
    revoked_at: i64,
}

/// Valid from five minutes ago (clocks differ a little) for `days`.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// A random, positive 128-bit serial number (revocation names certificates by it).
fn random_serial() -> Result<SerialNumber, CertError> {
    let mut b = [0u8; 16];
    let path = Path::new("/dev/urandom");
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    std::io::Read::read_exact(&mut f, &mut b).map_err(io_err(path))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// Replace `path` with `contents` atomically (write beside it, then rename), with `mode`.
fn replace_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Paths of the files `certs init` writes in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Create the CA and the destination certificate in `dir` (created if missing).
/// The destination certificate names `nvmirror-dest`, `localhost`, 127.0.0.1, ::1 and
/// every `extra_sans` entry (IP address or DNS name). Refuses to overwrite an existing CA.
pub fn init(dir: &Path, extra_sans: &[String]) -> Result<(), CertError> {
    let (ca_pem, ca_key) = ca_paths(dir);
    for p in [&ca_pem, &ca_key] {
        if p.exists() {
            return Err(CertError::CaExists { path: p.clone() });
        }
    }
    let dest_pem = dir.join("dest.pem");
    let dest_key = dir.join("dest.key");
    refuse_existing(&dest_pem)?;
    refuse_existing(&dest_key)?;
    let mut sans = vec![
        SanType::DnsName(
            DEST_SERVER_NAME
                .try_into()
                .map_err(rc("destination server name"))?,
        ),
        SanType::DnsName("localhost".try_into().map_err(rc("localhost"))?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ];
    for s in extra_sans {
        sans.push(san_of(s)?);
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;

    let ca_keypair = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut ca_params = CertificateParams::default();
    set_validity(&mut ca_params, CA_DAYS);
    ca_params.serial_number = Some(random_serial()?);
    ca_params.distinguished_name = dn("nvmirror CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_keypair)
        .map_err(rc("self-signing the CA"))?;
    let issuer = Issuer::new(ca_params, ca_keypair);

    let (dest_key_pem, dest_cert_pem) = sign_dest(&issuer, sans)?;

    // Key first, certificate last: a half-written CA is detected by `ca.pem` missing.
    write_new(&ca_key, &issuer.key().serialize_pem(), 0o600)?;
    write_new(&ca_pem, &ca_cert.pem(), 0o644)?;
    write_new(&dest_key, &dest_key_pem, 0o600)?;
    write_new(&dest_pem, &dest_cert_pem, 0o644)?;
    Ok(())
}

/// Issue a client certificate for source `name` (CN = name, SAN DNS = name), signed by the CA
/// in `dir`, valid for `days`; writes `dir/NAME.pem` and `dir/NAME.key` (never overwriting).
pub fn issue(dir: &Path, name: &str, days: u32) -> Result<(), CertError> {
    validate_name(name)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;
    let (key, cert) = sign_client(dir, name, days)?;
    write_new(&key_path, &key, 0o600)?;
    write_new(&cert_path, &cert, 0o644)?;
    Ok(())
}

/// Renew source `name`'s certificate: a new key and certificate valid for `days`, replacing
/// `dir/NAME.pem` and `dir/NAME.key` (each atomically). The old certificate stays valid until
/// it expires (revoke it to end it sooner); the source uses the new one from its next
/// connection.
pub fn renew(dir: &Path, name: &str, days: u32) -> Result<(), CertError> {
    validate_name(name)?;
    let (key, cert) = sign_client(dir, name, days)?;
    replace_file(&dir.join(format!("{name}.key")), &key, 0o600)?;
    replace_file(&dir.join(format!("{name}.pem")), &cert, 0o644)?;
    Ok(())
}

/// The CA of `dir`, for signing.
fn ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let (ca_pem, ca_key) = ca_paths(dir);
    let ca_keypair = KeyPair::from_pem(&read(&ca_key)?)
        .map_err(rc(format!("reading CA key {}", ca_key.display())))?;
    Issuer::from_ca_cert_pem(&read(&ca_pem)?, ca_keypair)
        .map_err(rc(format!("reading CA certificate {}", ca_pem.display())))
}

/// A new key and client certificate for `name`: (key PEM, certificate PEM).
fn sign_client(dir: &Path, name: &str, days: u32) -> Result<(String, String), CertError> {
    let issuer = ca_issuer(dir)?;
    let keypair = KeyPair::generate().map_err(rc("generating the client key"))?;
    let mut params = CertificateParams::default();
    set_validity(&mut params, days);
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = dn(name);
    params.subject_alt_names = vec![san_of(name)?];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&keypair, &issuer)
        .map_err(rc(format!("signing the certificate of {name}")))?;
    Ok((keypair.serialize_pem(), cert.pem()))
}

/// A new key and destination certificate naming `sans`: (key PEM, certificate PEM).
fn sign_dest(
    issuer: &Issuer<'static, KeyPair>,
    sans: Vec<SanType>,
) -> Result<(String, String), CertError> {
    let dest_keypair = KeyPair::generate().map_err(rc("generating the destination key"))?;
    let mut params = CertificateParams::default();
    set_validity(&mut params, DEST_DAYS);
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = dn(DEST_SERVER_NAME);
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let dest_cert = params
        .signed_by(&dest_keypair, issuer)
        .map_err(rc("signing the destination certificate"))?;
    Ok((dest_keypair.serialize_pem(), dest_cert.pem()))
}

/// Renew the destination's certificate (`dir/dest.pem`, `dir/dest.key`): a new key and
/// certificate with the same names and addresses plus `extra_sans`, valid [`DEST_DAYS`] days,
/// each file replaced atomically. `fs-dest serve` reads them at its next start; sources keep
/// trusting it (same CA). Returns the names and addresses the new certificate carries.
pub fn renew_dest(dir: &Path, extra_sans: &[String]) -> Result<Vec<String>, CertError> {
    let pem_path = dir.join("dest.pem");
    let pem = read(&pem_path)?;
    let (_, p) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CertError::Parse {
            path: pem_path.clone(),
            reason: e.to_string(),
        })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&p.contents).map_err(|e| CertError::Parse {
            path: pem_path.clone(),
            reason: e.to_string(),
        })?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(san_of(d)?),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => IpAddr::from(
                            <[u8; 4]>::try_from(*b)
                                .map_err(|_| CertError::BadSan(format!("{b:?}")))?,
                        ),
                        16 => IpAddr::from(
                            <[u8; 16]>::try_from(*b)
                                .map_err(|_| CertError::BadSan(format!("{b:?}")))?,
                        ),
                        _ => return Err(CertError::BadSan(format!("{b:?}"))),
                    };
                    sans.push(SanType::IpAddress(ip));
                }
                _ => {}
            }
        }
    }
    for s in extra_sans {
        let san = san_of(s)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let names = sans.iter().map(san_text).collect();
    let issuer = ca_issuer(dir)?;
    let (key, cert) = sign_dest(&issuer, sans)?;
    replace_file(&dir.join("dest.key"), &key, 0o600)?;
    replace_file(&pem_path, &cert, 0o644)?;
    Ok(names)
}

/// A subject alternative name as an operator writes it.
fn san_text(san: &SanType) -> String {
    match san {
        SanType::DnsName(d) => d.as_str().to_string(),
        SanType::IpAddress(ip) => ip.to_string(),
        other => format!("{other:?}"),
    }
}

/// What `certs revoke` did.
#[derive(Debug)]
pub struct Revocation {
    /// The serial number revoked, hex.
    pub serial: String,
    /// Where the revoked certificate and key were moved.
    pub moved_to: PathBuf,
}

/// Revoke source `name`'s certificate (`dir/NAME.pem`): add its serial number to the CA's
/// revocation list `dir/ca.crl` (a running `fs-dest serve` reloads it within seconds, refuses
/// new connections with it and closes the one open), and move the certificate and key aside
/// (`NAME.pem.revoked-SERIAL`), so `certs issue` can give the source a new one.
pub fn revoke(dir: &Path, name: &str) -> Result<Revocation, CertError> {
    validate_name(name)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let pem = read(&cert_path)?;
    let serial = serial_of_pem(&pem).map_err(|reason| CertError::Parse {
        path: cert_path.clone(),
        reason,
    })?;
    let mut list = load_revoked(dir)?;
    if !list.iter().any(|r| r.serial == serial) {
        list.push(Revoked {
            name: name.to_string(),
            serial: serial.clone(),
            revoked_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        });
    }
    write_crl(dir, &list)?;
    let body = serde_json::to_string_pretty(&list).map_err(|e| CertError::Parse {
        path: revoked_path(dir),
        reason: e.to_string(),
    })?;
    replace_file(&revoked_path(dir), &body, 0o644)?;
    let moved_to = dir.join(format!("{name}.pem.revoked-{serial}"));
    fs::rename(&cert_path, &moved_to).map_err(io_err(&cert_path))?;
    let key_path = dir.join(format!("{name}.key"));
    if key_path.exists() {
        let to = dir.join(format!("{name}.key.revoked-{serial}"));
        fs::rename(&key_path, &to).map_err(io_err(&key_path))?;
    }
    Ok(Revocation { serial, moved_to })
}

fn load_revoked(dir: &Path) -> Result<Vec<Revoked>, CertError> {
    let path = revoked_path(dir);
    match fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| CertError::Parse {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Sign and write `dir/ca.crl` listing `list`.
fn write_crl(dir: &Path, list: &[Revoked]) -> Result<(), CertError> {
    let issuer = ca_issuer(dir)?;
    let now = time::OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::new();
    for r in list {
        let bytes = hex_decode(&r.serial).ok_or_else(|| CertError::Parse {
            path: revoked_path(dir),
            reason: format!("serial {:?} is not hex", r.serial),
        })?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(r.revoked_at).unwrap_or(now),
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(i64::from(CA_DAYS)),
        crl_number: SerialNumber::from(list.len() as u64 + 1),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer)
        .map_err(rc("signing the revocation list"))?;
    let pem = crl.pem().map_err(rc("encoding the revocation list"))?;
    replace_file(&crl_path(dir), &pem, 0o644)
}

/// The serial number of the first certificate in `pem`, hex.
pub fn serial_of_pem(pem: &str) -> Result<String, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    serial_of_der(&p.contents)
}

/// The serial number of a DER certificate, hex.
pub fn serial_of_der(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(cert
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The serial numbers `dir/ca.crl` revokes, hex (empty when there is no list).
pub fn revoked_serials(dir: &Path) -> Result<Vec<String>, CertError> {
    Ok(load_revoked(dir)?.into_iter().map(|r| r.serial).collect())
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = if s.len() % 2 == 1 {
        format!("0{s}")
    } else {
        s.to_string()
    };
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "alpha", "A1.b_c-d", &"x".repeat(47)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".a", "-a", "a/b", "a b", "ä", &"x".repeat(48), "a\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn init_refuses_to_overwrite_and_issue_writes_files() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["10.1.2.3".into(), "dest.example".into()]).unwrap();
        for f in ["ca.pem", "ca.key", "dest.pem", "dest.key"] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let err = init(dir.path(), &[]).unwrap_err().to_string();
        assert!(
            err.contains("refusing to overwrite an existing CA"),
            "{err}"
        );
        issue(dir.path(), "alpha", 30).unwrap();
        assert!(dir.path().join("alpha.pem").exists());
        assert!(issue(dir.path(), "alpha", 30).is_err());
        assert!(issue(dir.path(), "../evil", 30).is_err());
    }

    #[test]
    fn renew_replaces_and_revoke_lists_the_serial_and_frees_the_name() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[]).unwrap();
        issue(dir.path(), "alpha", 30).unwrap();
        let first = serial_of_pem(&read(&dir.path().join("alpha.pem")).unwrap()).unwrap();
        renew(dir.path(), "alpha", 60).unwrap();
        let second = serial_of_pem(&read(&dir.path().join("alpha.pem")).unwrap()).unwrap();
        assert_ne!(first, second, "a renewed certificate is a new one");
        let r = revoke(dir.path(), "alpha").unwrap();
        assert_eq!(r.serial, second);
        assert!(!dir.path().join("alpha.pem").exists() && r.moved_to.exists());
        assert_eq!(revoked_serials(dir.path()).unwrap(), vec![second.clone()]);
        let crl = read(&crl_path(dir.path())).unwrap();
        assert!(crl.contains("BEGIN X509 CRL"), "{crl}");
        issue(dir.path(), "alpha", 30).unwrap();
        assert!(revoke(dir.path(), "nobody").is_err());
        let before = read(&dir.path().join("dest.pem")).unwrap();
        let names = renew_dest(dir.path(), &["10.9.8.7".into(), "localhost".into()]).unwrap();
        assert!(names.contains(&"nvmirror-dest".to_string()), "{names:?}");
        assert!(names.contains(&"10.9.8.7".to_string()), "{names:?}");
        assert_eq!(
            names.iter().filter(|n| *n == "localhost").count(),
            1,
            "a name already there is not added twice: {names:?}"
        );
        let again = renew_dest(dir.path(), &[]).unwrap();
        assert_eq!(again, names, "renewing keeps the names");
        let after = read(&dir.path().join("dest.pem")).unwrap();
        assert_ne!(before, after);
        assert_ne!(
            serial_of_pem(&before).unwrap(),
            serial_of_pem(&after).unwrap()
        );
    }
}

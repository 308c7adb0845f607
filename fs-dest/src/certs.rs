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
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
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

    let dest_keypair = KeyPair::generate().map_err(rc("generating the destination key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(DEST_SERVER_NAME);
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let dest_cert = params
        .signed_by(&dest_keypair, &issuer)
        .map_err(rc("signing the destination certificate"))?;

    // Key first, certificate last: a half-written CA is detected by `ca.pem` missing.
    write_new(&ca_key, &issuer.key().serialize_pem(), 0o600)?;
    write_new(&ca_pem, &ca_cert.pem(), 0o644)?;
    write_new(&dest_key, &dest_keypair.serialize_pem(), 0o600)?;
    write_new(&dest_pem, &dest_cert.pem(), 0o644)?;
    Ok(())
}

/// Issue a client certificate for source `name` (CN = name, SAN DNS = name), signed by the CA
/// in `dir`; writes `dir/NAME.pem` and `dir/NAME.key`.
pub fn issue(dir: &Path, name: &str) -> Result<(), CertError> {
    validate_name(name)?;
    let (ca_pem, ca_key) = ca_paths(dir);
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;
    let ca_keypair = KeyPair::from_pem(&read(&ca_key)?)
        .map_err(rc(format!("reading CA key {}", ca_key.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_pem)?, ca_keypair)
        .map_err(rc(format!("reading CA certificate {}", ca_pem.display())))?;

    let keypair = KeyPair::generate().map_err(rc("generating the client key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.subject_alt_names = vec![san_of(name)?];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&keypair, &issuer)
        .map_err(rc(format!("signing the certificate of {name}")))?;
    write_new(&key_path, &keypair.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(())
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
        issue(dir.path(), "alpha").unwrap();
        assert!(dir.path().join("alpha.pem").exists());
        assert!(issue(dir.path(), "alpha").is_err());
        assert!(issue(dir.path(), "../evil").is_err());
    }
}

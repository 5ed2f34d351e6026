//! A small certificate authority for migration endpoints (`ferry certs init|issue`).
//!
//! Live migration over TLS needs, on both hosts, a certificate signed by a CA
//! that the other host trusts, whose name the other host checks (the client
//! checks the server's name like QEMU's `tls-hostname`; the server checks the
//! client's name against its allow-list). Making those with `openssl` or
//! `certtool` is where mutual TLS set-ups usually go wrong (missing SAN,
//! missing clientAuth EKU, a world-readable key), so ferry makes them itself:
//!
//! - `init_ca(dir)` writes `dir/ca.pem` (the certificate both hosts trust) and
//!   `dir/ca.key` (mode 0600; keep it off the migration hosts if you can);
//! - `issue(dir, NAME)` writes `dir/NAME.pem` and `dir/NAME.key` (mode 0600),
//!   signed by that CA, with NAME as its SAN (DNS name, or IP address when NAME
//!   is an IPv4 address) and CN, and both serverAuth and clientAuth extended
//!   key usages, so one certificate serves a host as migration source (client)
//!   and destination (server).
//!
//! Keys are ECDSA P-256 (fast handshakes, supported by rustls' ring provider).
//! Files are written to a temporary name, synced, and linked into place, so a
//! crash never leaves a half-written key, and an existing file is never
//! silently replaced.
//!
//! The CA's distinguished name is derived from its key (`CA_COMMON_NAME` and a
//! key fingerprint): `issue` rebuilds the issuer from `ca.key`, then checks the new certificate against
//! `ca.pem` with the same verifier the transport uses, so a `ca.key` that does
//! not belong to `ca.pem` is an error, never a certificate nobody trusts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

/// The start of the CA certificate's common name, which goes on with the
/// first 8 bytes (hex) of the CA key's SHA-256 key identifier. Two CAs made by
/// ferry thus never share a name (with one name, a certificate from the other
/// CA would be reported as a bad signature instead of an unknown CA), and
/// `issue` can rebuild the issuer name from `ca.key` alone.
pub const CA_COMMON_NAME: &str = "ferry migration CA";

/// How long a CA made by [`init_ca`] is valid: ten years, so that rotating it is
/// a deliberate act rather than a surprise.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long a certificate made by [`issue`] is valid: one year (re-issue with
/// `ferry certs issue`; an expired certificate is refused with an error that
/// says so).
pub const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How far back `not_before` is set, so a peer whose clock is a little behind
/// does not refuse a certificate issued a moment ago.
pub const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Where [`init_ca`] wrote the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// `dir/ca.pem`: the CA certificate, the `ca` of every `TlsConfig`.
    pub cert: PathBuf,
    /// `dir/ca.key`: the CA's private key (mode 0600), needed only to issue.
    pub key: PathBuf,
}

/// Where [`issue`] wrote a certificate, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedPaths {
    /// The name the certificate is for (SAN and CN).
    pub name: String,
    /// `dir/NAME.pem`: the certificate, the `cert` of a `TlsConfig`.
    pub cert: PathBuf,
    /// `dir/NAME.key`: its private key (mode 0600), the `key` of a `TlsConfig`.
    pub key: PathBuf,
    /// The end of its validity.
    pub not_after: SystemTime,
}

/// What went wrong making a CA or a certificate, naming the file or the name.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The certificate name cannot be used (it becomes a file name and a DNS name).
    #[error("certificate name {name:?}: {reason}")]
    BadName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// A file that would be written exists already.
    #[error("{}: already exists; refusing to overwrite it{}", path.display(), hint)]
    Exists {
        /// The file.
        path: PathBuf,
        /// What to do instead.
        hint: &'static str,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A CA file exists but is not usable (not PEM, no key, too large, ...).
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA key does not belong to the CA certificate (or the CA was not made by ferry).
    #[error("{} and {}: {reason}", cert.display(), key.display())]
    CaMismatch {
        /// The CA certificate.
        cert: PathBuf,
        /// The CA key.
        key: PathBuf,
        /// What the check found.
        reason: String,
    },
    /// The requested validity period is empty.
    #[error("certificate validity: not_before must be earlier than not_after")]
    BadValidity,
    /// rcgen could not generate a key or encode a certificate.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, CertsError>;

/// The paths `init_ca` uses in `dir`.
pub fn ca_paths(dir: &Path) -> CaPaths {
    CaPaths { cert: dir.join("ca.pem"), key: dir.join("ca.key") }
}

/// The paths `issue` uses in `dir` for `name` (not validated here).
pub fn issued_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

/// Create a new CA in `dir` (made, mode 0700, if missing): `ca.pem` and `ca.key`.
///
/// Refuses when either file exists: replacing a CA silently would make every
/// certificate issued so far untrusted. Use [`init_ca_force`] to replace it.
pub fn init_ca(dir: &Path) -> Result<CaPaths> {
    make_ca(dir, false)
}

/// Like [`init_ca`], but replaces an existing CA (each file atomically).
///
/// Every certificate issued by the old CA stops being trusted by hosts that
/// are given the new `ca.pem`.
pub fn init_ca_force(dir: &Path) -> Result<CaPaths> {
    make_ca(dir, true)
}

fn make_ca(dir: &Path, overwrite: bool) -> Result<CaPaths> {
    let paths = ca_paths(dir);
    ensure_dir(dir)?;
    if !overwrite {
        for p in [&paths.cert, &paths.key] {
            refuse_existing(p, "; delete ca.pem and ca.key first to start a new CA (that invalidates every certificate the old one issued)")?;
        }
    }
    let now = SystemTime::now();
    let key = KeyPair::generate().map_err(|source| CertsError::Generate { what: "CA key".into(), source })?;
    let params = ca_params(&key, now.checked_sub(CLOCK_SKEW).unwrap_or(now), now + CA_VALIDITY);
    let cert =
        params.self_signed(&key).map_err(|source| CertsError::Generate { what: "CA certificate".into(), source })?;
    write_new(&paths.key, key.serialize_pem().as_bytes(), 0o600, overwrite)?;
    if let Err(e) = write_new(&paths.cert, cert.pem().as_bytes(), 0o644, overwrite) {
        if !overwrite {
            let _ = fs::remove_file(&paths.key);
        }
        return Err(e);
    }
    Ok(paths)
}

/// The CA's parameters; `issue` rebuilds them to sign (the name and key
/// identifier method must be the ones `ca.pem` was made with).
fn ca_params(key: &KeyPair, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let id: String = params.key_identifier(key).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {id}"));
    params.distinguished_name = dn;
    // Path length 0: this CA signs endpoint certificates, never other CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params
}

/// Issue a certificate for `name`, valid from an hour ago for [`CERT_VALIDITY`],
/// signed by the CA in `dir`: writes `dir/NAME.pem` and `dir/NAME.key`.
///
/// Refuses to overwrite an existing certificate or key of that name (delete
/// them first to re-issue), and refuses names [`validate_name`] rejects.
pub fn issue(dir: &Path, name: &str) -> Result<IssuedPaths> {
    let now = SystemTime::now();
    issue_with_validity(dir, name, now.checked_sub(CLOCK_SKEW).unwrap_or(now), now + CERT_VALIDITY)
}

/// Like [`issue`], with an explicit validity period.
///
/// Exists for tests of refusal paths: a period wholly in the past makes an
/// expired certificate, one in the future a not-yet-valid one.
pub fn issue_with_validity(
    dir: &Path,
    name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<IssuedPaths> {
    validate_name(name)?;
    if not_before >= not_after {
        return Err(CertsError::BadValidity);
    }
    let ca = ca_paths(dir);
    let ca_key_pem = read_pem_text(&ca.key)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| CertsError::BadFile { path: ca.key.clone(), reason: format!("not a usable private key: {e}") })?;
    let ca_cert_pem = crate::transport::read_bounded(&ca.cert)
        .map_err(|reason| CertsError::BadFile { path: ca.cert.clone(), reason })?;
    let ca_der = CertificateDer::from_pem_slice(&ca_cert_pem).map_err(|e| CertsError::BadFile {
        path: ca.cert.clone(),
        reason: format!("no PEM CERTIFICATE block ({e})"),
    })?;

    let (cert_path, key_path) = issued_paths(dir, name);
    for p in [&cert_path, &key_path] {
        refuse_existing(p, "; delete it first to re-issue")?;
    }

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names =
        vec![match name.parse::<Ipv4Addr>() {
            Ok(ip) => SanType::IpAddress(ip.into()),
            Err(_) => SanType::DnsName(name.try_into().map_err(|e| CertsError::BadName {
                name: name.to_string(),
                reason: format!("not an IA5 string ({e})"),
            })?),
        }];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();

    let key = KeyPair::generate().map_err(|source| CertsError::Generate { what: format!("key for {name}"), source })?;
    // The CA's own validity does not matter to the issuer name; only its DN,
    // key-identifier method and key do.
    let issuer = Issuer::new(ca_params(&ca_key, not_before, not_after), ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertsError::Generate { what: format!("certificate for {name}"), source })?;

    check_chain(&ca, &ca_der, cert.der(), not_before, not_after)?;

    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600, false)?;
    if let Err(e) = write_new(&cert_path, cert.pem().as_bytes(), 0o644, false) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(IssuedPaths { name: name.to_string(), cert: cert_path, key: key_path, not_after })
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`, for messages about validity.
pub fn format_utc(t: SystemTime) -> String {
    let d = time::OffsetDateTime::from(t);
    format!("{} {:02}:{:02}:{:02} UTC", d.date(), d.hour(), d.minute(), d.second())
}

/// Check that a certificate name is usable as a file name in the CA directory
/// and as a DNS name (or IPv4 address) in a certificate.
///
/// Accepted: 1-253 characters of ASCII letters, digits, '-' and '.', in
/// dot-separated labels of 1-63 characters that neither start nor end with
/// '-'. So no '/', no "..", no leading or trailing dot, no spaces. `ca` is
/// refused because `ca.pem`/`ca.key` are the CA's own files.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Err(CertsError::BadName { name: name.to_string(), reason: reason.to_string() });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.')) {
        return Err(CertsError::BadName {
            name: name.to_string(),
            reason: format!("character {c:?} is not allowed (only letters, digits, '-' and '.')"),
        });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label (leading, trailing or double dot)");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    if name.eq_ignore_ascii_case("ca") {
        return bad("reserved: ca.pem and ca.key are the CA's own files");
    }
    Ok(())
}

/// Verify a freshly issued certificate against the CA certificate for both
/// TLS uses, with the verifier rustls uses, at a time inside its validity.
fn check_chain(
    ca: &CaPaths,
    ca_der: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<()> {
    let mismatch = |reason: String| CertsError::CaMismatch { cert: ca.cert.clone(), key: ca.key.clone(), reason };
    let anchor = webpki::anchor_from_trusted_cert(ca_der)
        .map_err(|e| mismatch(format!("the CA certificate cannot be parsed ({e})")))?;
    let ee =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| mismatch(format!("issued certificate unparsable ({e})")))?;
    let mid = not_before + not_after.duration_since(not_before).unwrap_or_default() / 2;
    let at = UnixTime::since_unix_epoch(mid.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        ee.verify_for_usage(algs, std::slice::from_ref(&anchor), &[], at, usage, None, None).map_err(|e| {
            mismatch(format!(
                "a certificate signed with this key does not verify against this CA certificate ({e}); \
                 is ca.key the key of ca.pem, and was the CA made by `ferry certs init`?"
            ))
        })?;
    }
    Ok(())
}

fn read_pem_text(path: &Path) -> Result<String> {
    let bytes =
        crate::transport::read_bounded(path).map_err(|reason| CertsError::BadFile { path: path.into(), reason })?;
    String::from_utf8(bytes)
        .map_err(|_| CertsError::BadFile { path: path.into(), reason: "not PEM text (not UTF-8)".into() })
}

fn ensure_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(CertsError::Io { path: dir.into(), source: io::Error::other("not a directory") }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertsError::Io { path: dir.into(), source }),
        Err(source) => Err(CertsError::Io { path: dir.into(), source }),
    }
}

fn refuse_existing(path: &Path, hint: &'static str) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(CertsError::Exists { path: path.into(), hint }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CertsError::Io { path: path.into(), source }),
    }
}

/// Write `data` to `path` with `mode`: to a temporary file in the same
/// directory (created exclusively, so the mode holds from the first byte),
/// synced, then renamed over `path` (overwrite) or hard-linked to it (which
/// fails if `path` exists, so nothing is ever clobbered by a race).
fn write_new(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<()> {
    let io_err = |source| CertsError::Io { path: path.into(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| io_err(io::Error::other("no file name")))?;
    let tmp = dir.join(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f: File = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        if overwrite {
            fs::rename(&tmp, path)
        } else {
            fs::hard_link(&tmp, path)
        }
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(CertsError::Exists { path: path.into(), hint: "; it appeared while writing" })
        }
        Err(e) => Err(io_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn ca_and_certificate_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        assert_eq!(fs::metadata(&ca.key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(fs::read_to_string(&ca.cert).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        let issued = issue(dir.path(), "dst.example").unwrap();
        assert_eq!(issued.cert, dir.path().join("dst.example.pem"));
        assert_eq!(fs::metadata(&issued.key).unwrap().permissions().mode() & 0o777, 0o600);
        // The certificate carries the name as SAN and is usable for both TLS roles.
        let pem = fs::read(&issued.cert).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        assert_eq!(ee.valid_dns_names().collect::<Vec<_>>(), vec!["dst.example"]);
        let ca_der = CertificateDer::from_pem_slice(&fs::read(&ca.cert).unwrap()).unwrap();
        check_chain(&ca, &ca_der, &der, SystemTime::now(), SystemTime::now() + Duration::from_secs(60)).unwrap();
        // No leftover temporary files.
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["ca.key", "ca.pem", "dst.example.key", "dst.example.pem"]);
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let before = fs::read(dir.path().join("ca.key")).unwrap();
        let e = init_ca(dir.path()).unwrap_err();
        assert!(matches!(e, CertsError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("ca.pem") || e.to_string().contains("ca.key"), "{e}");
        assert_eq!(fs::read(dir.path().join("ca.key")).unwrap(), before);
        issue(dir.path(), "src").unwrap();
        let e = issue(dir.path(), "src").unwrap_err();
        assert!(e.to_string().contains("src.pem") && e.to_string().contains("already exists"), "{e}");
        // Forcing replaces the CA; certificates of the old one no longer chain.
        init_ca_force(dir.path()).unwrap();
        assert_ne!(fs::read(dir.path().join("ca.key")).unwrap(), before);
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "a/b", "..", "../x", "a..b", ".a", "a.", "-a", "a-", "a b", "a_b", "ca", "CA", "a:1", "é"] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, CertsError::BadName { .. }), "{bad:?}: {e}");
        }
        assert!(validate_name(&"a".repeat(64)).is_err());
        for good in ["src", "dst-1", "host.example.com", "10.0.0.2", "A1"] {
            validate_name(good).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let e = issue(dir.path(), "../evil").unwrap_err();
        assert!(e.to_string().contains("\"../evil\""), "{e}");
        assert!(!dir.path().parent().unwrap().join("evil.pem").exists());
    }

    #[test]
    fn ip_names_get_ip_sans() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let issued = issue(dir.path(), "127.0.0.1").unwrap();
        let der = CertificateDer::from_pem_slice(&fs::read(&issued.cert).unwrap()).unwrap();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        let ip = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        ee.verify_is_valid_for_subject_name(&ip).unwrap();
    }

    #[test]
    fn issue_without_ca_or_with_foreign_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = issue(dir.path(), "src").unwrap_err();
        assert!(e.to_string().contains("ca.key"), "{e}");
        // A CA key that is not the key of ca.pem is caught before anything is written.
        let other = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        init_ca(other.path()).unwrap();
        fs::copy(other.path().join("ca.key"), dir.path().join("ca.key")).unwrap();
        let e = issue(dir.path(), "src").unwrap_err();
        assert!(matches!(e, CertsError::CaMismatch { .. }), "{e}");
        assert!(!dir.path().join("src.pem").exists() && !dir.path().join("src.key").exists());
    }

    #[test]
    fn validity_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let now = SystemTime::now();
        assert!(matches!(issue_with_validity(dir.path(), "x", now, now).unwrap_err(), CertsError::BadValidity));
        let day = Duration::from_secs(86400);
        let p = issue_with_validity(dir.path(), "old", now - 3 * day, now - day).unwrap();
        assert!(p.not_after < now);
        assert_eq!(format_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(951_825_600)), "2000-02-29 12:00:00 UTC");
    }
}

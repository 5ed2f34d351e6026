//! Encryption at rest: AES-256-GCM with a fresh data key per image, wrapped by
//! a key-encryption key derived from the user's key file.
//!
//! Why a wrapped per-image key: nonces can then be simple counters (section
//! kind + index) without any risk of reuse across images, and a wrong key file
//! is detected once, at open, when the unwrap's tag fails.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::hash::{from_hex, to_hex, Hash32};
use crate::header::EncryptionParams;

/// BLAKE3 derive-key context turning key-file bytes into the key-encryption key.
pub const KEY_FILE_CONTEXT: &str = "ferry image key-file v1";
/// BLAKE3 derive-key context turning the data key into the root-tag MAC key.
pub(crate) const ROOT_TAG_CONTEXT: &str = "ferry image root tag v1";
/// Associated data of the data-key wrap.
pub(crate) const WRAP_AAD: &[u8] = b"ferry image data key v1";
/// Length of the GCM tag appended to every encrypted payload.
pub const TAG_LEN: usize = 16;

/// The largest key file accepted, in bytes.
///
/// A key file holds a secret (32 bytes from /dev/urandom are plenty, and the
/// whole file is hashed into a 256-bit key anyway), so anything larger than a
/// page is a mistake: a wrong path, an image or a device such as /dev/zero.
/// The bound is checked before reading and enforced while reading, so a key
/// file never costs more than this many bytes (plus one) of memory.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Opening with O_NONBLOCK: a path swapped for a FIFO after the stat cannot block the open.
const O_NONBLOCK: i32 = libc::O_NONBLOCK;

/// Which kind of record a nonce belongs to; part of the nonce so indices never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum NonceKind {
    /// A memory chunk (index = chunk index).
    Chunk = 1,
    /// The VM state section (index 0).
    State = 2,
    /// The CPU register section (index 0).
    Cpus = 3,
}

/// The user's secret: the key-encryption key derived from a key file's bytes.
///
/// Any bytes work as a key file (e.g. 32 bytes from /dev/urandom); the same
/// file must be given to read the image back.
#[derive(Clone)]
pub struct UserKey {
    kek: Zeroizing<[u8; 32]>,
}

impl UserKey {
    /// Derives the key-encryption key from key-file contents; refuses an empty file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::InvalidArgument("key file is empty".into()));
        }
        Ok(UserKey { kek: Zeroizing::new(blake3::derive_key(KEY_FILE_CONTEXT, bytes)) })
    }

    /// Reads a key file and derives the key from its contents.
    ///
    /// The path is the user's (a CLI flag or the API's `key_file`), so it is
    /// checked before anything is read: it must be a regular file (symlinks
    /// are followed) of 1 to `MAX_KEY_FILE_BYTES` bytes. `/dev/zero`, a FIFO,
    /// a directory or a huge file is refused with the path and the reason,
    /// never read until memory runs out or opened in a way that blocks. The
    /// read itself is bounded too, so a file that grows meanwhile is refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        // stat before open: opening a FIFO for reading blocks until a writer
        // comes, and opening a device can have side effects.
        let meta = std::fs::metadata(path).map_err(|e| Error::io("read key file", path, e))?;
        check_key_file_meta(path, &meta)?;
        // O_NONBLOCK: should the path be swapped for a FIFO after the stat, the
        // open returns at once (and the fstat below refuses it) instead of
        // blocking. It has no effect on regular files.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io("open key file", path, e))?;
        let meta = file.metadata().map_err(|e| Error::io("stat key file", path, e))?;
        check_key_file_meta(path, &meta)?;
        let bytes = read_key_bytes(&file, path)?;
        Self::from_bytes(&bytes)
    }
}

/// Reads at most `MAX_KEY_FILE_BYTES` + 1 bytes, refusing more (a file that
/// grew after its size was checked) and none.
fn read_key_bytes(r: impl Read, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    // Capacity for the whole bound up front: the buffer never reallocates, so
    // no copy of the secret is left behind in freed memory.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_BYTES as usize + 1));
    r.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io("read key file", path, e))?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(Error::KeyFileTooBig {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            max: MAX_KEY_FILE_BYTES,
        });
    }
    if bytes.is_empty() {
        return Err(Error::KeyFileEmpty { path: path.to_path_buf() });
    }
    Ok(bytes)
}

/// Refuses a key file that is not a regular file or is larger than `MAX_KEY_FILE_BYTES`.
fn check_key_file_meta(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if !meta.is_file() {
        return Err(Error::KeyFileNotRegular { path: path.to_path_buf(), kind: file_kind(&meta.file_type()) });
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(Error::KeyFileTooBig { path: path.to_path_buf(), size: meta.len(), max: MAX_KEY_FILE_BYTES });
    }
    Ok(())
}

/// What kind of file this is, for "X is a character device, not a regular file".
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a file of unknown type"
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserKey(..)")
    }
}

/// Why a data key could not be unwrapped.
pub(crate) enum UnwrapError {
    /// The GCM tag failed: the user key is not the one the image was written with.
    WrongKey,
    /// The public parameters themselves are malformed.
    BadParams(String),
}

/// An image's data key, ready to seal and open records.
pub(crate) struct DataKey {
    aead: ring::aead::LessSafeKey,
    mac_key: Zeroizing<[u8; 32]>,
}

/// The 12-byte GCM nonce for a record: u32le kind, then u64le index.
fn nonce(kind: NonceKind, index: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&(kind as u32).to_le_bytes());
    n[4..].copy_from_slice(&index.to_le_bytes());
    n
}

/// Fills `buf` from the OS random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> std::result::Result<(), String> {
    getrandom::fill(buf).map_err(|e| format!("OS random source failed: {e}"))
}

impl DataKey {
    fn from_raw(raw: &[u8; 32]) -> Self {
        let key =
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, raw).expect("32-byte key is valid for AES-256-GCM");
        DataKey {
            aead: ring::aead::LessSafeKey::new(key),
            mac_key: Zeroizing::new(blake3::derive_key(ROOT_TAG_CONTEXT, raw)),
        }
    }

    /// Makes a fresh random data key and its wrapped form for the header.
    pub(crate) fn generate(user: &UserKey) -> std::result::Result<(Self, EncryptionParams), String> {
        let mut raw = Zeroizing::new([0u8; 32]);
        random_bytes(&mut raw[..])?;
        let mut wrap_nonce = [0u8; 12];
        random_bytes(&mut wrap_nonce)?;
        let kek = Aes256Gcm::new((&*user.kek).into());
        let mut wrapped = raw.to_vec();
        let tag = kek
            .encrypt_in_place_detached(Nonce::from_slice(&wrap_nonce), WRAP_AAD, &mut wrapped)
            .map_err(|_| "wrapping the data key failed".to_string())?;
        wrapped.extend_from_slice(&tag);
        let params = EncryptionParams {
            cipher: "aes-256-gcm".into(),
            kdf: "blake3-derive-key".into(),
            kdf_context: KEY_FILE_CONTEXT.into(),
            wrap_nonce: to_hex(&wrap_nonce),
            wrapped_key: to_hex(&wrapped),
        };
        Ok((Self::from_raw(&raw), params))
    }

    /// Unwraps the data key recorded in the header with the user's key.
    pub(crate) fn unwrap(params: &EncryptionParams, user: &UserKey) -> std::result::Result<Self, UnwrapError> {
        if params.kdf_context != KEY_FILE_CONTEXT {
            return Err(UnwrapError::BadParams(format!("unknown kdf_context {:?}", params.kdf_context)));
        }
        let n = from_hex(&params.wrap_nonce).map_err(|e| UnwrapError::BadParams(format!("wrap_nonce: {e}")))?;
        let w = Zeroizing::new(
            from_hex(&params.wrapped_key).map_err(|e| UnwrapError::BadParams(format!("wrapped_key: {e}")))?,
        );
        if n.len() != 12 || w.len() != 32 + TAG_LEN {
            return Err(UnwrapError::BadParams(format!(
                "wrap_nonce is {} bytes (want 12), wrapped_key is {} bytes (want 48)",
                n.len(),
                w.len()
            )));
        }
        let kek = Aes256Gcm::new((&*user.kek).into());
        let mut raw = Zeroizing::new([0u8; 32]);
        raw.copy_from_slice(&w[..32]);
        kek.decrypt_in_place_detached(Nonce::from_slice(&n), WRAP_AAD, &mut raw[..], Tag::from_slice(&w[32..]))
            .map_err(|_| UnwrapError::WrongKey)?;
        Ok(Self::from_raw(&raw))
    }

    /// Encrypts `buf` in place and appends the tag.
    pub(crate) fn seal(
        &self,
        kind: NonceKind,
        index: u64,
        aad: &[&[u8]],
        buf: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let aad = join(aad);
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce(kind, index));
        let tag = self
            .aead
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(&aad[..]), buf)
            .map_err(|_| "AES-GCM encryption failed (payload too large?)".to_string())?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts `buf` (ciphertext then tag) in place; returns the plaintext length, or
    /// `None` when the tag does not verify.
    pub(crate) fn open(&self, kind: NonceKind, index: u64, aad: &[&[u8]], buf: &mut [u8]) -> Option<usize> {
        let n = buf.len().checked_sub(TAG_LEN)?;
        let aad = join(aad);
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce(kind, index));
        let plain = self.aead.open_in_place(nonce, ring::aead::Aad::from(&aad[..]), buf).ok()?;
        debug_assert_eq!(plain.len(), n);
        Some(n)
    }

    /// Keyed tag over the root hash: proves the whole image (including which
    /// chunks exist and their order) was written by a holder of the key.
    pub(crate) fn root_tag(&self, root: &Hash32) -> Hash32 {
        blake3::keyed_hash(&self.mac_key, &root.0).into()
    }
}

/// Concatenates associated-data parts (small: header hash + a record prefix).
fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_key() {
        let k = UserKey::from_bytes(b"secret").unwrap();
        let (dk, params) = DataKey::generate(&k).unwrap();
        let dk2 = DataKey::unwrap(&params, &k).ok().unwrap();
        let mut buf = b"hello world".to_vec();
        dk.seal(NonceKind::Chunk, 7, &[b"aad"], &mut buf).unwrap();
        assert_eq!(buf.len(), 11 + TAG_LEN);
        let mut copy = buf.clone();
        assert_eq!(dk2.open(NonceKind::Chunk, 7, &[b"a", b"ad"], &mut copy), Some(11));
        assert_eq!(&copy[..11], b"hello world");
        // Wrong index, kind or aad fail.
        assert!(dk2.open(NonceKind::Chunk, 8, &[b"aad"], &mut buf.clone()).is_none());
        assert!(dk2.open(NonceKind::State, 7, &[b"aad"], &mut buf.clone()).is_none());
        assert!(dk2.open(NonceKind::Chunk, 7, &[b"aae"], &mut buf.clone()).is_none());
        let wrong = UserKey::from_bytes(b"secreT").unwrap();
        assert!(matches!(DataKey::unwrap(&params, &wrong), Err(UnwrapError::WrongKey)));
    }

    /// ring (bulk records) and aes-gcm (key wrap) must be the same cipher:
    /// a record sealed by one opens with the other.
    #[test]
    fn records_are_standard_aes_256_gcm() {
        let raw = [7u8; 32];
        let dk = DataKey::from_raw(&raw);
        let mut buf = b"interoperable".to_vec();
        dk.seal(NonceKind::Chunk, 3, &[b"hdr", b"run"], &mut buf).unwrap();
        let other = Aes256Gcm::new((&raw).into());
        let n = buf.len() - TAG_LEN;
        let (ct, tag) = buf.split_at_mut(n);
        other
            .decrypt_in_place_detached(
                Nonce::from_slice(&nonce(NonceKind::Chunk, 3)),
                b"hdrrun",
                ct,
                Tag::from_slice(tag),
            )
            .unwrap();
        assert_eq!(ct, b"interoperable");
    }

    #[test]
    fn empty_key_file_refused() {
        assert!(UserKey::from_bytes(b"").is_err());
        assert_eq!(format!("{:?}", UserKey::from_bytes(b"x").unwrap()), "UserKey(..)");
    }

    #[test]
    fn key_file_size_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, vec![7u8; MAX_KEY_FILE_BYTES as usize]).unwrap();
        let k = UserKey::from_file(&p).unwrap();
        assert_eq!(*k.kek, *UserKey::from_bytes(&[7u8; MAX_KEY_FILE_BYTES as usize]).unwrap().kek);

        std::fs::write(&p, vec![7u8; MAX_KEY_FILE_BYTES as usize + 1]).unwrap();
        let e = UserKey::from_file(&p).unwrap_err();
        assert!(matches!(e, Error::KeyFileTooBig { size: 4097, max: 4096, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("key file {} is 4097 bytes", p.display())), "{msg}");
        assert!(msg.contains("4096"), "{msg}");

        // A large sparse file is refused from its size alone, without reading it.
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 30).unwrap();
        let e = UserKey::from_file(&p).unwrap_err();
        assert!(matches!(e, Error::KeyFileTooBig { size, .. } if size == 64 << 30), "{e:?}");

        std::fs::write(&p, b"").unwrap();
        let e = UserKey::from_file(&p).unwrap_err();
        assert!(matches!(e, Error::KeyFileEmpty { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("key file {} is empty", p.display()));

        let missing = dir.path().join("missing");
        let e = UserKey::from_file(&missing).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
    }

    #[test]
    fn key_file_must_be_a_regular_file() {
        let e = UserKey::from_file(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, Error::KeyFileNotRegular { kind: "a character device", .. }), "{e:?}");
        assert_eq!(e.to_string(), "key file /dev/zero is a character device, not a regular file");

        let dir = tempfile::tempdir().unwrap();
        let e = UserKey::from_file(dir.path()).unwrap_err();
        assert_eq!(e.to_string(), format!("key file {} is a directory, not a regular file", dir.path().display()));

        // Symlinks are followed: to a regular file is fine, to a device is not.
        let real = dir.path().join("real");
        std::fs::write(&real, b"secret").unwrap();
        let good = dir.path().join("good");
        std::os::unix::fs::symlink(&real, &good).unwrap();
        assert_eq!(*UserKey::from_file(&good).unwrap().kek, *UserKey::from_bytes(b"secret").unwrap().kek);
        let bad = dir.path().join("bad");
        std::os::unix::fs::symlink("/dev/zero", &bad).unwrap();
        let e = UserKey::from_file(&bad).unwrap_err();
        assert!(matches!(e, Error::KeyFileNotRegular { kind: "a character device", .. }), "{e:?}");

        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = UserKey::from_file(&sock).unwrap_err();
        assert!(matches!(e, Error::KeyFileNotRegular { kind: "a socket", .. }), "{e:?}");
    }

    #[test]
    fn key_read_is_bounded_even_if_the_file_grows() {
        // An endless reader stands in for a file that grows after the size check.
        let p = Path::new("/growing/key");
        let e = read_key_bytes(std::io::repeat(1), p).unwrap_err();
        assert!(matches!(e, Error::KeyFileTooBig { size: 4097, max: 4096, .. }), "{e:?}");
        assert_eq!(read_key_bytes(&b"k"[..], p).unwrap().as_slice(), b"k");
        assert!(matches!(read_key_bytes(std::io::empty(), p), Err(Error::KeyFileEmpty { .. })));
    }

    /// Makes a FIFO with mkfifo(1) (this crate has no libc dependency).
    fn mkfifo(path: &Path) {
        let st = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
        assert!(st.success(), "mkfifo {} failed", path.display());
    }

    /// Runs `f` on a thread and fails the test if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} blocked"))
    }

    #[test]
    fn key_file_fifo_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let p = fifo.clone();
        let e = within_10s("UserKey::from_file on a FIFO", move || UserKey::from_file(&p)).unwrap_err();
        assert_eq!(e.to_string(), format!("key file {} is a FIFO (named pipe), not a regular file", fifo.display()));
    }

    /// The open after the stat uses O_NONBLOCK, so a path swapped for a FIFO in
    /// between cannot block it either: check the flag really is O_NONBLOCK.
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    #[test]
    fn nonblocking_open_of_a_fifo_returns_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let f = within_10s("opening a FIFO with O_NONBLOCK", move || {
            std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(&fifo)
        })
        .unwrap();
        assert!(f.metadata().unwrap().file_type().is_fifo());
    }
}

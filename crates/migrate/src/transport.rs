//! Migration transports: where a migration stream goes and how it is protected.
//!
//! A migration moves guest memory (secrets included) between hosts, so the
//! network path is authenticated and encrypted unless the user says otherwise:
//!
//! - [`Address`]: `tcp://HOST:PORT` or `unix://PATH`, parsed with errors that
//!   say what is missing.
//! - [`Security`] (listener) and [`ClientSecurity`] (connector): TLS 1.3 with
//!   *mutual* authentication, or plain bytes only when the user chose
//!   [`Security::Insecure`] explicitly (there is no default).
//! - [`Listener::bind`] / [`Listener::accept`] and [`connect`] give a
//!   [`Transport`]: a connected `Read + Write + Send` byte stream, the same
//!   type for plain TCP, unix sockets and TLS.
//!
//! ## TLS
//!
//! rustls with the ring provider (no C build beyond ring, which ferry-image
//! already uses), TLS 1.3 only, no session resumption (a migration is one long
//! connection; a full handshake costs well under a millisecond).
//!
//! - Both sides present a certificate signed by the CA in their
//!   [`TlsConfig::ca`] (`ferry certs init|issue` makes them: see
//!   [`crate::certs`]).
//! - The client checks the server's certificate name against the `peer_name`
//!   it is given (by default the host of the address, as QEMU's
//!   `tls-hostname`).
//! - The server accepts only a client whose certificate carries one of its
//!   `allowed_peers` as a SAN, exactly (a wildcard SAN never matches an
//!   allow-list entry). Only the SAN is read: the CN is ignored, as webpki and
//!   RFC 6125 do, and `ferry certs issue` always writes the name as SAN.
//! - A refusal is an error value naming the reason: expired, not yet valid,
//!   unknown CA, name mismatch (with the names the certificate has), peer not
//!   allowed (with the presented names and the allow-list), no client
//!   certificate, or the alert the peer sent when *it* refused us.
//!
//! In TLS 1.3 the client finishes its handshake before the server has checked
//! the client's certificate, so a client would otherwise learn of a refusal
//! only at its first read. Ferry's server therefore sends
//! [`ACCEPT_CONFIRMATION`] (8 bytes, inside TLS) once it has accepted the
//! client, and [`connect`] returns only after reading it: a `connect` that
//! returns `Ok` means both sides accepted each other. Plain TCP and unix
//! transports add nothing to the byte stream.
//!
//! ## Timeouts and threads
//!
//! Every TCP socket has `TCP_NODELAY` (Nagle's algorithm cost Cloud
//! Hypervisor 45-90 ms of migration downtime on small final messages).
//! Connecting and the handshake are bounded by the caller's timeout; after
//! that, reads and writes block unless [`Transport::set_timeouts`] sets
//! limits. A read or write that times out fails with `WouldBlock` or
//! `TimedOut`, as std's sockets do.
//!
//! A TLS stream cannot be cloned like a socket: one TLS state encrypts and
//! decrypts. [`Transport::split`] gives a [`TransportReader`] and a
//! [`TransportWriter`] that can be used from two threads (pages going one way
//! while acknowledgements or post-copy page requests come the other way).
//! They share the TLS state behind a mutex that is held only while
//! encrypting or decrypting, never while blocked on the socket, so a reader
//! waiting for data never stalls the writer and the two directions cannot
//! deadlock each other. Encryption and decryption of one connection do not
//! run in parallel; for more throughput use more connections.
//!
//! After a write error on a TLS transport, part of a record may have been
//! sent; the writer refuses further writes, because the peer could no longer
//! decrypt them.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Sent by a TLS server, inside TLS, once it has accepted the client's
/// certificate; [`connect`] waits for it so that a refused client learns it
/// at connect time (see the module documentation).
pub const ACCEPT_CONFIRMATION: &[u8; 8] = b"ferry-ok";

/// The largest certificate, key or CA file ferry reads. PEM files are a few
/// KiB; a bigger one is the wrong file, and reading it unbounded would let a
/// mistaken path (a disk image, `/dev/zero`) exhaust memory.
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// The longest unix socket path Linux accepts (`sun_path` less its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// How long [`Listener::accept`] gives a connected client to finish the TLS
/// handshake, unless [`Listener::set_handshake_timeout`] says otherwise. It is
/// separate from the accept timeout so that a client that connects and stays
/// silent cannot hold the listener for the whole accept window.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Plaintext encrypted per lock of the TLS state: large enough that locking
/// and the socket write are amortised, small enough that the reader half is
/// never kept waiting long.
const WRITE_CHUNK: usize = 256 * 1024;

/// Ciphertext read from the socket per system call by a TLS reader.
const READ_BUF: usize = 128 * 1024;

/// Errors of the transports, each saying what failed and where: the address,
/// the file, the peer name, and for TLS the verification reason.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An address string could not be parsed (or cannot be used that way).
    #[error("bad migration address {input:?}: {reason}")]
    BadAddress {
        /// The string as given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket operation failed.
    #[error("{op} {addr}: {source}")]
    Io {
        /// The operation ("bind", "connect to", "accept on", ...).
        op: &'static str,
        /// The address or peer it was for.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// An operation did not finish in time.
    #[error("{op} {addr}: timed out after {} ms", after.as_millis())]
    Timeout {
        /// The operation ("connect to", "TLS handshake with", "accept on").
        op: &'static str,
        /// The address or peer it was for.
        addr: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// A certificate, key or CA file cannot be used.
    #[error("{what} file {}: {reason}", path.display())]
    File {
        /// Which file of the [`TlsConfig`]: "certificate", "key" or "CA".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The TLS settings cannot work (found before any connection is made).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The TLS handshake failed, or a peer was refused.
    #[error("TLS with {peer}: {failure}")]
    Tls {
        /// Who the other side was: the address and expected name (client), or
        /// the client's socket address (server).
        peer: String,
        /// Why.
        failure: TlsFailure,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TransportError>;

/// Why a TLS handshake failed, as data, so that callers and tests can tell an
/// expired certificate from an unknown CA without parsing messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The peer's certificate is past its `notAfter`.
    #[error("the peer's certificate has expired{}", not_after.as_ref().map(|t| format!(" (valid until {t})")).unwrap_or_default())]
    Expired {
        /// When it stopped being valid, when known.
        not_after: Option<String>,
    },
    /// The peer's certificate is before its `notBefore`.
    #[error("the peer's certificate is not valid yet (are both clocks right?)")]
    NotYetValid,
    /// The peer's certificate is not signed by the CA we trust.
    #[error("the peer's certificate is not signed by the trusted CA (unknown CA)")]
    UnknownCa,
    /// The server's certificate is not for the name the client expected.
    #[error("name mismatch: expected {expected:?}, the peer's certificate is for {presented:?}")]
    NameMismatch {
        /// The name the client checked for.
        expected: String,
        /// The names in the certificate.
        presented: Vec<String>,
    },
    /// The client's certificate is valid but its name is not allowed.
    #[error("peer {presented:?} is not allowed; allowed peers: {allowed:?}")]
    PeerNotAllowed {
        /// The names in the client's certificate.
        presented: Vec<String>,
        /// The server's allow-list.
        allowed: Vec<String>,
    },
    /// The client sent no certificate.
    #[error("the client presented no certificate; one signed by the CA is required")]
    NoCertificate,
    /// The peer's certificate is unusable for another reason.
    #[error("the peer's certificate is unusable: {0}")]
    BadCertificate(String),
    /// The peer refused us with a TLS alert (it did not accept our certificate,
    /// our name, or the protocol).
    #[error("the peer refused the handshake: {meaning} (TLS alert {alert})")]
    RefusedByPeer {
        /// The alert's name, e.g. `UnknownCA`.
        alert: String,
        /// What it means for us.
        meaning: String,
    },
    /// The peer closed the connection before the handshake completed.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// Any other TLS failure, in rustls' words.
    #[error("{0}")]
    Protocol(String),
}

// ---------------------------------------------------------------------------
// Addresses

/// Where a migration listens or connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `tcp://HOST:PORT`: HOST is a DNS name, an IPv4 address, or an IPv6
    /// address in brackets (stored without them). Port 0 means "any free
    /// port" when listening and is refused when connecting.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix://PATH`: a unix stream socket (same host, e.g. tests or a local
    /// VMM upgrade).
    Unix(PathBuf),
}

impl Address {
    /// The host of a TCP address: the name a client checks the server's
    /// certificate against unless told otherwise. None for unix sockets.
    pub fn host(&self) -> Option<&str> {
        match self {
            Address::Tcp { host, .. } => Some(host),
            Address::Unix(_) => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

impl FromStr for Address {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Address> {
        let bad = |reason: String| TransportError::BadAddress { input: s.to_string(), reason };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad("expected tcp://HOST:PORT or unix://PATH".into()));
        };
        match scheme {
            "tcp" => parse_tcp(rest).map_err(bad),
            "unix" => {
                if rest.is_empty() {
                    return Err(bad("missing socket path after unix://".into()));
                }
                if rest.contains('\0') {
                    return Err(bad("socket path contains a NUL byte".into()));
                }
                if rest.len() > MAX_UNIX_PATH {
                    return Err(bad(format!(
                        "socket path is {} bytes; Linux allows at most {MAX_UNIX_PATH}",
                        rest.len()
                    )));
                }
                Ok(Address::Unix(PathBuf::from(rest)))
            }
            other => Err(bad(format!("unknown scheme {other:?}; expected tcp:// or unix://"))),
        }
    }
}

fn parse_tcp(rest: &str) -> std::result::Result<Address, String> {
    if rest.is_empty() {
        return Err("missing HOST:PORT after tcp://".into());
    }
    if rest.contains('/') {
        return Err("a TCP address has no path (expected tcp://HOST:PORT)".into());
    }
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (host, after) = inner.split_once(']').ok_or("missing ']' after an IPv6 address")?;
        host.parse::<Ipv6Addr>().map_err(|_| format!("{host:?} is not an IPv6 address"))?;
        let port = after.strip_prefix(':').ok_or("missing :PORT (expected tcp://[IPV6]:PORT)")?;
        (host, port)
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or("missing :PORT (expected tcp://HOST:PORT)")?;
        if host.contains(':') {
            return Err("an IPv6 address needs brackets: tcp://[ADDR]:PORT".into());
        }
        if host.is_empty() {
            return Err("missing HOST before :PORT".into());
        }
        if let Some(c) = host.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.')) {
            return Err(format!("host {host:?} has character {c:?}; expected a DNS name or an IP address"));
        }
        (host, port)
    };
    if port.is_empty() {
        return Err("missing PORT after ':'".into());
    }
    let port = port.parse::<u16>().map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok(Address::Tcp { host: host.to_string(), port })
}

// ---------------------------------------------------------------------------
// TLS configuration

/// The PEM files of one endpoint: its certificate and key, and the CA that
/// signs its peers' certificates. `ferry certs` writes them as
/// `DIR/NAME.pem`, `DIR/NAME.key` and `DIR/ca.pem` ([`TlsConfig::in_dir`]).
///
/// Paths, not contents: the files are read (bounded to [`MAX_PEM_FILE`],
/// regular files only) when a listener is bound or a connection is made, so a
/// re-issued certificate is picked up without restarting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// This endpoint's certificate (chain), PEM `CERTIFICATE` blocks, leaf first.
    pub cert: PathBuf,
    /// This endpoint's private key: PEM PKCS#8, SEC1 (EC) or PKCS#1 (RSA).
    pub key: PathBuf,
    /// The CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
}

impl TlsConfig {
    /// The files `ferry certs` writes for `name` in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsConfig {
        TlsConfig {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    /// Read and check all three files (PEM syntax, key matching the
    /// certificate, CA usable as a trust anchor) without connecting, so a
    /// command can report a wrong path before it starts a migration.
    pub fn validate(&self) -> Result<()> {
        let m = self.load()?;
        CertifiedKey::from_der(m.certs, m.key, &provider()).map_err(|e| TransportError::File {
            what: "key",
            path: self.key.clone(),
            reason: format!("does not fit certificate {}: {e}", self.cert.display()),
        })?;
        Ok(())
    }

    fn load(&self) -> Result<Material> {
        let certs = load_certs(&self.cert, "certificate")?;
        let key = load_key(&self.key)?;
        let ca = load_certs(&self.ca, "CA")?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| TransportError::File {
                what: "CA",
                path: self.ca.clone(),
                reason: format!("a certificate cannot be used as a trust anchor: {e}"),
            })?;
        }
        Ok(Material { certs, key, roots: Arc::new(roots) })
    }
}

struct Material {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

/// Read a small file whole: refuses non-regular files (a FIFO, a device, a
/// directory) and files over [`MAX_PEM_FILE`], and never blocks on opening a
/// FIFO. The error is the reason only; callers add the path.
pub(crate) fn read_bounded(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(format!("is {} bytes; a PEM file may be at most {MAX_PEM_FILE}", meta.len()));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_PEM_FILE + 1).read_to_end(&mut buf).map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(format!("grew beyond {MAX_PEM_FILE} bytes while being read"));
    }
    if buf.iter().all(|b| b.is_ascii_whitespace()) {
        return Err("is empty".into());
    }
    Ok(buf)
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let file_err = |reason: String| TransportError::File { what, path: path.to_path_buf(), reason };
    let bytes = read_bounded(path).map_err(file_err)?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        certs.push(item.map_err(|e| file_err(format!("not valid PEM: {e}")))?);
    }
    if certs.is_empty() {
        return Err(file_err("no PEM CERTIFICATE block (is this a certificate file?)".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let file_err = |reason: String| TransportError::File { what: "key", path: path.to_path_buf(), reason };
    let bytes = read_bounded(path).map_err(file_err)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            file_err("no private key (PEM PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block) found".into())
        }
        e => file_err(format!("not valid PEM: {e}")),
    })
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

// ---------------------------------------------------------------------------
// Security

/// How a [`Listener`] protects and authenticates its connections.
#[derive(Debug, Clone)]
pub enum Security {
    /// No encryption, no authentication. Only for trusted networks or unix
    /// sockets, and only when the user asked for it: guest memory crosses the
    /// wire in the clear and anyone who can connect can inject a VM.
    Insecure,
    /// TLS 1.3; the client must present a certificate signed by `config.ca`
    /// whose SAN is one of `allowed_peers` (exact match).
    Tls {
        /// This server's certificate, key and the CA for clients.
        config: TlsConfig,
        /// Names of the clients (sources) allowed to connect; not empty.
        allowed_peers: Vec<String>,
    },
}

/// How [`connect`] protects and authenticates its connection.
///
/// Separate from [`Security`] because a client has no allow-list: it checks
/// the one name it is given.
#[derive(Debug, Clone)]
pub enum ClientSecurity {
    /// No encryption, no authentication (see [`Security::Insecure`]).
    Insecure,
    /// TLS 1.3 presenting `cert`, verifying the server against `ca` and the
    /// peer name given to [`connect`].
    Tls(TlsConfig),
}

/// Who connected to a [`Listener`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's socket address (`IP:PORT`, or the listener's path for unix sockets).
    pub addr: String,
    /// The name the peer authenticated as (the allow-list entry its
    /// certificate matched); None without TLS.
    pub name: Option<String>,
}

/// Which kind of stream a [`Transport`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Plain TCP.
    Tcp,
    /// Unix stream socket.
    Unix,
    /// TLS 1.3 (over TCP, or over a unix socket).
    Tls,
}

// ---------------------------------------------------------------------------
// Sockets

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let r = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        }
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves rustls' state as consistent as any
    // error would; the next operation reports the connection's error.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Transport

/// State both halves of a transport share.
struct Shared {
    sock: Sock,
    tls: Option<TlsState>,
    kind: TransportKind,
    peer: String,
    peer_name: Option<String>,
}

struct TlsState {
    conn: Mutex<Connection>,
    /// Held by whoever takes ciphertext out of `conn` until it is on the
    /// socket, so records reach the wire in sequence-number order.
    wire: Mutex<()>,
}

/// A connected migration stream: plain TCP, unix socket or TLS, used the same
/// way through `Read` and `Write`.
///
/// From one thread, use it directly; to read and write from two threads,
/// [`split`](Transport::split) it. Writes go to the socket before `write`
/// returns (there is no user-space buffering to flush), so a `BufWriter` in
/// front of it is how to batch small messages.
pub struct Transport {
    reader: TransportReader,
    writer: TransportWriter,
}

/// The receiving half of a [`Transport`], for a thread of its own.
pub struct TransportReader {
    shared: Arc<Shared>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
}

/// Cuts a connection from another thread: a reader or writer blocked on it
/// returns at once with an error. A cancel uses it so that it does not wait
/// out a stalled peer's timeout.
#[derive(Clone)]
pub struct LinkCutter {
    shared: Arc<Shared>,
}

impl LinkCutter {
    /// Shuts the socket down in both directions.
    pub fn cut(&self) {
        let _ = match &self.shared.sock {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl fmt::Debug for LinkCutter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkCutter").field("peer", &self.shared.peer).finish()
    }
}

/// The sending half of a [`Transport`], for a thread of its own.
pub struct TransportWriter {
    shared: Arc<Shared>,
    tx: Vec<u8>,
    broken: bool,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.reader.shared;
        f.debug_struct("Transport")
            .field("kind", &s.kind)
            .field("peer", &s.peer)
            .field("peer_name", &s.peer_name)
            .finish()
    }
}

impl Transport {
    fn new(sock: Sock, conn: Option<Connection>, peer: String, peer_name: Option<String>) -> Transport {
        let kind = match (&sock, &conn) {
            (_, Some(_)) => TransportKind::Tls,
            (Sock::Tcp(_), None) => TransportKind::Tcp,
            (Sock::Unix(_), None) => TransportKind::Unix,
        };
        let tls = conn.map(|c| TlsState { conn: Mutex::new(c), wire: Mutex::new(()) });
        let shared = Arc::new(Shared { sock, tls, kind, peer, peer_name });
        Transport {
            reader: TransportReader { shared: shared.clone(), rx: Vec::new(), rx_start: 0, rx_end: 0 },
            writer: TransportWriter { shared, tx: Vec::new(), broken: false },
        }
    }

    /// Plain TCP, unix socket, or TLS.
    pub fn kind(&self) -> TransportKind {
        self.reader.shared.kind
    }

    /// The other end's socket address (or the socket path), for messages.
    pub fn peer(&self) -> &str {
        &self.reader.shared.peer
    }

    /// The name the other end authenticated as: the server's verified name on
    /// a client, the matched allow-list entry on a server; None without TLS.
    pub fn peer_name(&self) -> Option<&str> {
        self.reader.shared.peer_name.as_deref()
    }

    /// The negotiated TLS cipher suite (e.g. `TLS13_AES_256_GCM_SHA384`), for
    /// logs and benchmark reports; None without TLS.
    pub fn cipher_suite(&self) -> Option<String> {
        let tls = self.reader.shared.tls.as_ref()?;
        lock(&tls.conn).negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))
    }

    /// Limit how long one read and one write may block (None: forever).
    ///
    /// The limits belong to the socket, so they apply to both halves after a
    /// [`split`](Transport::split) too. A zero duration is refused (std
    /// treats it as an error, not as "non-blocking").
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> Result<()> {
        self.reader.set_read_timeout(read)?;
        self.writer.set_write_timeout(write)
    }

    /// Separate the stream into a reader and a writer for two threads. For
    /// TLS they share the TLS state (see the module documentation); for
    /// plain sockets they share the socket.
    pub fn split(self) -> (TransportReader, TransportWriter) {
        (self.reader, self.writer)
    }

    /// Close both directions: for TLS, send `close_notify` first so the peer
    /// can tell a clean end from a truncated stream; then shut the socket
    /// down, which also wakes a read blocked in another thread.
    pub fn shutdown(&mut self) -> Result<()> {
        self.writer.close_notify();
        let s = &self.reader.shared;
        s.sock.shutdown(Shutdown::Both).map_err(|source| TransportError::Io {
            op: "shut down",
            addr: s.peer.clone(),
            source,
        })
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl TransportReader {
    /// The socket of a plain unix connection (no TLS), for passing file
    /// descriptors beside the stream (a local migration's guest memory).
    pub fn unix_fd(&self) -> Option<RawFd> {
        match (&self.shared.sock, &self.shared.tls) {
            (Sock::Unix(s), None) => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    /// A handle that can cut this connection from another thread.
    pub fn cutter(&self) -> LinkCutter {
        LinkCutter { shared: self.shared.clone() }
    }

    /// Limit how long one read may block (None: forever; zero is refused).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        let s = &self.shared;
        s.sock.set_read_timeout(t).map_err(|source| TransportError::Io {
            op: "set read timeout on",
            addr: s.peer.clone(),
            source,
        })
    }

    /// The other end's socket address (or the socket path).
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    fn read_tls(&mut self, tls: &TlsState, buf: &mut [u8]) -> io::Result<usize> {
        // Each pass returns plaintext, consumes buffered ciphertext, or makes
        // one socket read (which the read timeout bounds), so the loop ends.
        loop {
            {
                let mut conn = lock(&tls.conn);
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.rx_start < self.rx_end {
                    // No plaintext is buffered (the read above said so), so
                    // rustls has room for what this ciphertext decrypts to.
                    let mut input = &self.rx[self.rx_start..self.rx_end];
                    let before = input.len();
                    let fed = conn.read_tls(&mut input);
                    self.rx_start += before - input.len();
                    fed?;
                    if let Err(e) = conn.process_new_packets() {
                        // Send the alert rustls queued, unless the writer is
                        // busy on the socket (then the peer sees the close).
                        if let Ok(_wire) = tls.wire.try_lock() {
                            let mut sock = &self.shared.sock;
                            while conn.wants_write() && conn.write_tls(&mut sock).is_ok() {}
                        }
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    continue;
                }
            }
            if self.rx.len() < READ_BUF {
                self.rx.resize(READ_BUF, 0);
            }
            let n = (&self.shared.sock).read(&mut self.rx)?;
            self.rx_start = 0;
            self.rx_end = n;
            if n == 0 {
                // End of stream: tell rustls, which then reports a clean close
                // (close_notify seen: Ok(0)) or a truncation (UnexpectedEof).
                let mut conn = lock(&tls.conn);
                conn.read_tls(&mut io::empty())?;
                return match conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    r => r,
                };
            }
        }
    }
}

impl Read for TransportReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = self.shared.clone();
        match &shared.tls {
            None => (&shared.sock).read(buf),
            Some(tls) => self.read_tls(tls, buf),
        }
    }
}

impl TransportWriter {
    /// The socket of a plain unix connection (no TLS), for passing file descriptors.
    pub fn unix_fd(&self) -> Option<RawFd> {
        match (&self.shared.sock, &self.shared.tls) {
            (Sock::Unix(s), None) => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    /// Limit how long one write may block (None: forever; zero is refused).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> Result<()> {
        let s = &self.shared;
        s.sock.set_write_timeout(t).map_err(|source| TransportError::Io {
            op: "set write timeout on",
            addr: s.peer.clone(),
            source,
        })
    }

    /// The other end's socket address (or the socket path).
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Close the sending direction (TLS `close_notify`, then a socket
    /// half-close): the peer reads end-of-stream, and can still send to the
    /// reader half.
    pub fn shutdown(&mut self) -> Result<()> {
        self.close_notify();
        let s = &self.shared;
        s.sock.shutdown(Shutdown::Write).map_err(|source| TransportError::Io {
            op: "shut down",
            addr: s.peer.clone(),
            source,
        })
    }

    fn close_notify(&mut self) {
        let shared = self.shared.clone();
        if let (Some(tls), false) = (&shared.tls, self.broken) {
            let _wire = lock(&tls.wire);
            let mut conn = lock(&tls.conn);
            conn.send_close_notify();
            let mut sock = &shared.sock;
            while conn.wants_write() && conn.write_tls(&mut sock).is_ok() {}
        }
    }

    fn write_tls(&mut self, tls: &TlsState, buf: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "an earlier write on this TLS stream failed"));
        }
        let chunk = &buf[..buf.len().min(WRITE_CHUNK)];
        let _wire = lock(&tls.wire);
        let mut accepted = 0;
        let mut failed = None;
        {
            let mut conn = lock(&tls.conn);
            self.tx.clear();
            // rustls takes up to its buffer limit (64 KiB) per call; draining
            // the records after each call makes room for the next.
            while accepted < chunk.len() && failed.is_none() {
                match conn.writer().write(&chunk[accepted..]) {
                    Ok(0) => break,
                    Ok(n) => accepted += n,
                    Err(e) => failed = Some(e),
                }
                while conn.wants_write() && failed.is_none() {
                    if let Err(e) = conn.write_tls(&mut self.tx) {
                        failed = Some(e);
                    }
                }
            }
        }
        // Records taken out of rustls must reach the socket whole, or the
        // peer cannot decrypt anything after them: any failure from here on
        // breaks the stream for good.
        if let Err(e) = (&self.shared.sock).write_all(&self.tx) {
            self.broken = true;
            return Err(e);
        }
        if let Some(e) = failed {
            self.broken = true;
            if accepted == 0 {
                return Err(e);
            }
        }
        Ok(accepted)
    }
}

impl Write for TransportWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = self.shared.clone();
        match &shared.tls {
            None => (&shared.sock).write(buf),
            Some(tls) => self.write_tls(tls, buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Handshake driving, bounded by a deadline

enum HsError {
    Io(io::Error),
    Timeout,
    Eof,
    Tls(rustls::Error),
}

fn arm(sock: &Sock, deadline: Instant) -> std::result::Result<(), HsError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HsError::Timeout);
    }
    sock.set_read_timeout(Some(left)).map_err(HsError::Io)?;
    sock.set_write_timeout(Some(left)).map_err(HsError::Io)
}

fn io_hs(e: io::Error) -> HsError {
    if is_timeout(&e) {
        HsError::Timeout
    } else {
        HsError::Io(e)
    }
}

fn flush_tls(conn: &mut Connection, sock: &Sock, deadline: Instant) -> std::result::Result<(), HsError> {
    while conn.wants_write() {
        arm(sock, deadline)?;
        let mut w = sock;
        conn.write_tls(&mut w).map_err(io_hs)?;
    }
    Ok(())
}

fn read_some_tls(conn: &mut Connection, sock: &Sock, deadline: Instant) -> std::result::Result<(), HsError> {
    arm(sock, deadline)?;
    let mut r = sock;
    if conn.read_tls(&mut r).map_err(io_hs)? == 0 {
        return Err(HsError::Eof);
    }
    if let Err(e) = conn.process_new_packets() {
        // Tell the peer why (rustls queued an alert), best effort.
        let _ = flush_tls(conn, sock, deadline);
        return Err(HsError::Tls(e));
    }
    Ok(())
}

fn drive_handshake(conn: &mut Connection, sock: &Sock, deadline: Instant) -> std::result::Result<(), HsError> {
    while conn.is_handshaking() {
        flush_tls(conn, sock, deadline)?;
        if conn.is_handshaking() {
            read_some_tls(conn, sock, deadline)?;
        }
    }
    flush_tls(conn, sock, deadline)
}

fn read_plain_exact(
    conn: &mut Connection,
    sock: &Sock,
    buf: &mut [u8],
    deadline: Instant,
) -> std::result::Result<(), HsError> {
    let mut got = 0;
    while got < buf.len() {
        match conn.reader().read(&mut buf[got..]) {
            Ok(0) => return Err(HsError::Eof),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => read_some_tls(conn, sock, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(HsError::Eof),
            Err(e) => return Err(HsError::Io(e)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Classifying TLS errors

fn pretty_name(general_name: &str) -> String {
    // webpki reports names as `DnsName("x")` / `IpAddress(1.2.3.4)`.
    if let Some(s) = general_name.strip_prefix("DnsName(\"").and_then(|s| s.strip_suffix("\")")) {
        return s.to_string();
    }
    if let Some(s) = general_name.strip_prefix("IpAddress(").and_then(|s| s.strip_suffix(')')) {
        return s.to_string();
    }
    general_name.to_string()
}

fn fmt_unix_time(t: UnixTime) -> String {
    crate::certs::format_utc(std::time::UNIX_EPOCH + Duration::from_secs(t.as_secs()))
}

fn alert_meaning(a: AlertDescription) -> &'static str {
    match a {
        AlertDescription::UnknownCA => "it does not trust the CA that signed our certificate",
        AlertDescription::CertificateExpired => "it says our certificate has expired or is not valid yet",
        AlertDescription::AccessDenied => "our certificate's name is not on its allow-list",
        AlertDescription::CertificateRequired => "it requires a client certificate",
        AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
            "it rejected our certificate (wrong name or bad certificate)"
        }
        AlertDescription::UnsupportedCertificate => "our certificate is not usable for this purpose",
        AlertDescription::CertificateRevoked => "our certificate is revoked",
        AlertDescription::DecryptError => "a signature did not verify",
        AlertDescription::ProtocolVersion => "it does not speak TLS 1.3",
        AlertDescription::HandshakeFailure => "no common TLS parameters",
        _ => "see the alert",
    }
}

/// Turn a rustls error into a [`TlsFailure`]. `expected` is the name a client
/// checked; `not_allowed` the names a server's allow-list refused.
fn classify(e: &rustls::Error, expected: Option<&str>, not_allowed: Option<(Vec<String>, Vec<String>)>) -> TlsFailure {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(ce) => match ce {
            CertificateError::Expired => TlsFailure::Expired { not_after: None },
            CertificateError::ExpiredContext { not_after, .. } => {
                TlsFailure::Expired { not_after: Some(fmt_unix_time(*not_after)) }
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => TlsFailure::NotYetValid,
            CertificateError::UnknownIssuer => TlsFailure::UnknownCa,
            CertificateError::NotValidForName => {
                TlsFailure::NameMismatch { expected: expected.unwrap_or_default().to_string(), presented: Vec::new() }
            }
            CertificateError::NotValidForNameContext { expected: exp, presented } => TlsFailure::NameMismatch {
                expected: expected.map(str::to_string).unwrap_or_else(|| exp.to_str().into_owned()),
                presented: presented.iter().map(|p| pretty_name(p)).collect(),
            },
            CertificateError::ApplicationVerificationFailure if not_allowed.is_some() => {
                let (presented, allowed) = not_allowed.unwrap_or_default();
                TlsFailure::PeerNotAllowed { presented, allowed }
            }
            CertificateError::BadSignature => {
                TlsFailure::BadCertificate("its signature does not verify against the CA".into())
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                TlsFailure::BadCertificate("not valid for this TLS role (extended key usage)".into())
            }
            other => TlsFailure::BadCertificate(other.to_string()),
        },
        E::NoCertificatesPresented => TlsFailure::NoCertificate,
        E::AlertReceived(a) => TlsFailure::RefusedByPeer { alert: format!("{a:?}"), meaning: alert_meaning(*a).into() },
        other => TlsFailure::Protocol(other.to_string()),
    }
}

fn hs_error(
    err: HsError,
    peer: &str,
    deadline_len: Duration,
    expected: Option<&str>,
    not_allowed: Option<(Vec<String>, Vec<String>)>,
) -> TransportError {
    match err {
        HsError::Timeout => {
            TransportError::Timeout { op: "TLS handshake with", addr: peer.to_string(), after: deadline_len }
        }
        HsError::Io(source) => TransportError::Io { op: "TLS handshake with", addr: peer.to_string(), source },
        HsError::Eof => TransportError::Tls { peer: peer.to_string(), failure: TlsFailure::Closed },
        HsError::Tls(e) => TransportError::Tls { peer: peer.to_string(), failure: classify(&e, expected, not_allowed) },
    }
}

// ---------------------------------------------------------------------------
// Server-side allow-list

/// The SAN entries of a certificate, for messages: DNS names and IP addresses.
fn presented_names(ee: &webpki::EndEntityCert<'_>) -> Vec<String> {
    // Asking for a name no certificate has makes webpki list what it has,
    // IP addresses included (valid_dns_names() has only DNS names).
    if let Ok(probe) = ServerName::try_from("ferry-name-probe.invalid") {
        if let Err(webpki::Error::CertNotValidForName(ctx)) = ee.verify_is_valid_for_subject_name(&probe) {
            return ctx.presented.iter().map(|p| pretty_name(p)).collect();
        }
    }
    ee.valid_dns_names().map(str::to_string).collect()
}

/// The first allow-list entry the certificate is valid for, by webpki's name
/// check, and for DNS names only when the certificate lists the name itself
/// (not through a wildcard). Err: the names the certificate presents.
fn match_allowed(der: &CertificateDer<'_>, allowed: &[String]) -> std::result::Result<String, Vec<String>> {
    let Ok(ee) = webpki::EndEntityCert::try_from(der) else {
        return Err(Vec::new());
    };
    for name in allowed {
        let Ok(server_name) = ServerName::try_from(name.as_str()) else { continue };
        if ee.verify_is_valid_for_subject_name(&server_name).is_err() {
            continue;
        }
        let literal = match server_name {
            ServerName::IpAddress(_) => true,
            _ => ee.valid_dns_names().any(|n| n.eq_ignore_ascii_case(name)),
        };
        if literal {
            return Ok(name.clone());
        }
    }
    Err(presented_names(&ee))
}

/// WebPKI client verification plus the allow-list, one per accepted
/// connection so that its outcome belongs to that handshake alone.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Arc<Vec<String>>,
    outcome: Mutex<Option<std::result::Result<String, Vec<String>>>>,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let outcome = match_allowed(end_entity, &self.allowed);
        let ok = outcome.is_ok();
        *lock(&self.outcome) = Some(outcome);
        if ok {
            Ok(verified)
        } else {
            // Alert access_denied: the client learns its name was refused.
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------
// Listener

struct ServerTls {
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    cert: Arc<SingleCertAndKey>,
    allowed: Arc<Vec<String>>,
}

enum ListenSock {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we made, so drop removes only ours.
        id: (u64, u64),
    },
}

/// A bound migration endpoint (the destination side) that accepts
/// connections one at a time, each authenticated per its [`Security`].
///
/// A refused or failed connection is an error from that
/// [`accept`](Listener::accept); the listener stays usable, so a port
/// scanner or an unauthorised host cannot stop a migration from arriving.
/// A unix socket file made by `bind` is removed when the listener is dropped.
pub struct Listener {
    sock: ListenSock,
    addr: Address,
    tls: Option<ServerTls>,
    handshake_timeout: Duration,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener").field("addr", &self.addr).field("tls", &self.tls.is_some()).finish()
    }
}

impl Listener {
    /// Bind `addr` (TCP port 0: any free port, see [`local_addr`](Listener::local_addr)).
    ///
    /// With [`Security::Tls`] the certificate, key and CA are read and checked
    /// now, so a wrong file is reported before any peer connects. A stale
    /// unix socket file (one nobody listens on) is replaced; any other
    /// existing file is an error.
    pub fn bind(addr: &Address, security: Security) -> Result<Listener> {
        let tls = match security {
            Security::Insecure => None,
            Security::Tls { config, allowed_peers } => Some(server_tls(&config, allowed_peers)?),
        };
        let io_err = |source| TransportError::Io { op: "bind", addr: addr.to_string(), source };
        let (sock, addr) = match addr {
            Address::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs().map_err(io_err)?.collect();
                let l = TcpListener::bind(&addrs[..]).map_err(io_err)?;
                l.set_nonblocking(true).map_err(io_err)?;
                let local = l.local_addr().map_err(io_err)?;
                (ListenSock::Tcp(l), Address::Tcp { host: host.clone(), port: local.port() })
            }
            Address::Unix(path) => {
                remove_stale_socket(path).map_err(io_err)?;
                let l = UnixListener::bind(path).map_err(io_err)?;
                l.set_nonblocking(true).map_err(io_err)?;
                let m = std::fs::symlink_metadata(path).map_err(io_err)?;
                (ListenSock::Unix { listener: l, path: path.clone(), id: (m.dev(), m.ino()) }, addr.clone())
            }
        };
        Ok(Listener { sock, addr, tls, handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT })
    }

    /// The bound address, with the real port when port 0 was asked for.
    pub fn local_addr(&self) -> Address {
        self.addr.clone()
    }

    /// How long a connected client has to finish the TLS handshake
    /// (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// Wait up to `timeout` for a connection, then (for TLS) run the
    /// handshake within the handshake timeout and check the client against
    /// the allow-list. The stream returned has no read or write timeouts.
    pub fn accept(&self, timeout: Duration) -> Result<(Transport, PeerInfo)> {
        let (sock, peer) = self.accept_socket(timeout)?;
        let Some(tls) = &self.tls else {
            let info = PeerInfo { addr: peer.clone(), name: None };
            return Ok((Transport::new(sock, None, peer, None), info));
        };
        let who = format!("client {peer} on {}", self.addr);
        let verifier = Arc::new(AllowListVerifier {
            inner: tls.verifier.clone(),
            allowed: tls.allowed.clone(),
            outcome: Mutex::new(None),
        });
        let mut config = ServerConfig::builder_with_provider(tls.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(tls.cert.clone());
        config.send_tls13_tickets = 0;
        let mut conn = Connection::Server(
            ServerConnection::new(Arc::new(config)).map_err(|e| TransportError::Config(e.to_string()))?,
        );
        let deadline = Instant::now() + self.handshake_timeout;
        let result = drive_handshake(&mut conn, &sock, deadline).and_then(|()| {
            conn.writer().write_all(ACCEPT_CONFIRMATION).map_err(HsError::Io)?;
            flush_tls(&mut conn, &sock, deadline)
        });
        let outcome = lock(&verifier.outcome).take();
        if let Err(e) = result {
            let not_allowed = match outcome {
                Some(Err(presented)) => Some((presented, tls.allowed.to_vec())),
                _ => None,
            };
            return Err(hs_error(e, &who, self.handshake_timeout, None, not_allowed));
        }
        let name = match outcome {
            Some(Ok(name)) => name,
            // rustls called the verifier or the handshake would have failed.
            _ => return Err(TransportError::Tls { peer: who, failure: TlsFailure::NoCertificate }),
        };
        clear_timeouts(&sock, &who)?;
        let info = PeerInfo { addr: peer.clone(), name: Some(name.clone()) };
        Ok((Transport::new(sock, Some(conn), peer, Some(name)), info))
    }

    fn accept_socket(&self, timeout: Duration) -> Result<(Sock, String)> {
        let addr = self.addr.to_string();
        let deadline = Instant::now() + timeout;
        let io_err = |source| TransportError::Io { op: "accept on", addr: addr.clone(), source };
        // Bounded by the deadline: each pass polls at most the time left.
        loop {
            let accepted = match &self.sock {
                ListenSock::Tcp(l) => l.accept().map(|(s, a)| (Sock::Tcp(s), a.to_string())),
                ListenSock::Unix { listener, path, .. } => {
                    listener.accept().map(|(s, _)| (Sock::Unix(s), format!("unix://{}", path.display())))
                }
            };
            match accepted {
                Ok((sock, peer)) => {
                    match &sock {
                        Sock::Tcp(s) => {
                            s.set_nonblocking(false).map_err(io_err)?;
                            s.set_nodelay(true).map_err(io_err)?;
                        }
                        Sock::Unix(s) => s.set_nonblocking(false).map_err(io_err)?,
                    }
                    return Ok((sock, peer));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(io_err(e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout { op: "accept on", addr, after: timeout });
            }
            poll_readable(self.raw_fd(), left).map_err(io_err)?;
        }
    }

    fn raw_fd(&self) -> RawFd {
        match &self.sock {
            ListenSock::Tcp(l) => l.as_raw_fd(),
            ListenSock::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenSock::Unix { path, id, .. } = &self.sock {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if (m.dev(), m.ino()) == *id {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

fn server_tls(config: &TlsConfig, allowed_peers: Vec<String>) -> Result<ServerTls> {
    if allowed_peers.is_empty() {
        return Err(TransportError::Config(
            "a TLS listener needs at least one allowed peer name (the names of the source hosts' certificates)".into(),
        ));
    }
    for name in &allowed_peers {
        if ServerName::try_from(name.as_str()).is_err() {
            return Err(TransportError::Config(format!("allowed peer {name:?} is not a DNS name or IP address")));
        }
    }
    let m = config.load()?;
    let provider = Arc::new(provider());
    let key = CertifiedKey::from_der(m.certs, m.key, &provider).map_err(|e| TransportError::File {
        what: "key",
        path: config.key.clone(),
        reason: format!("does not fit certificate {}: {e}", config.cert.display()),
    })?;
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots, provider.clone())
        .build()
        .map_err(|e| TransportError::File { what: "CA", path: config.ca.clone(), reason: e.to_string() })?;
    Ok(ServerTls { provider, verifier, cert: Arc::new(SingleCertAndKey::from(key)), allowed: Arc::new(allowed_peers) })
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is listening on this socket")),
        },
        Ok(_) => Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")),
    }
}

fn clear_timeouts(sock: &Sock, who: &str) -> Result<()> {
    let r = sock.set_read_timeout(None).and_then(|()| sock.set_write_timeout(None));
    r.map_err(|source| TransportError::Io { op: "set timeouts on", addr: who.to_string(), source })
}

fn poll_readable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // Round up so a sub-millisecond remainder still waits instead of spinning.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Client

/// Connect to a migration listener (the source side) within `timeout`, which
/// bounds connecting, the TLS handshake and the server's confirmation.
///
/// With TLS, the server's certificate must chain to `ca` and be valid for
/// `peer_name` (a DNS name or IP address; pass [`Address::host`] unless the
/// user names the destination otherwise); our certificate is presented to
/// the server, whose allow-list must contain our name. Without TLS
/// `peer_name` is not used. The stream returned has no read or write
/// timeouts.
pub fn connect(addr: &Address, security: &ClientSecurity, peer_name: &str, timeout: Duration) -> Result<Transport> {
    let deadline = Instant::now() + timeout;
    let client = match security {
        ClientSecurity::Insecure => None,
        ClientSecurity::Tls(config) => Some(client_config(config, peer_name)?),
    };
    let (sock, peer) = connect_socket(addr, deadline, timeout)?;
    let Some((config, server_name)) = client else {
        return Ok(Transport::new(sock, None, peer, None));
    };
    let who = format!("server {addr} (expected name {peer_name:?})");
    let mut conn = Connection::Client(
        ClientConnection::new(config, server_name).map_err(|e| TransportError::Config(e.to_string()))?,
    );
    let result = drive_handshake(&mut conn, &sock, deadline).and_then(|()| {
        let mut confirmation = [0u8; ACCEPT_CONFIRMATION.len()];
        read_plain_exact(&mut conn, &sock, &mut confirmation, deadline)?;
        if &confirmation != ACCEPT_CONFIRMATION {
            return Err(HsError::Tls(rustls::Error::General(
                "the server did not confirm the connection (not a ferry migration listener?)".into(),
            )));
        }
        Ok(())
    });
    if let Err(e) = result {
        return Err(hs_error(e, &who, timeout, Some(peer_name), None));
    }
    clear_timeouts(&sock, &who)?;
    Ok(Transport::new(sock, Some(conn), peer, Some(peer_name.to_string())))
}

fn client_config(config: &TlsConfig, peer_name: &str) -> Result<(Arc<ClientConfig>, ServerName<'static>)> {
    let server_name = ServerName::try_from(peer_name.to_string())
        .map_err(|_| TransportError::Config(format!("peer name {peer_name:?} is not a DNS name or IP address")))?;
    let m = config.load()?;
    let provider = Arc::new(provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(m.roots, provider.clone())
        .build()
        .map_err(|e| TransportError::File { what: "CA", path: config.ca.clone(), reason: e.to_string() })?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(m.certs, m.key)
        .map_err(|e| TransportError::File {
            what: "key",
            path: config.key.clone(),
            reason: format!("does not fit certificate {}: {e}", config.cert.display()),
        })?;
    client.resumption = Resumption::disabled();
    Ok((Arc::new(client), server_name))
}

fn connect_socket(addr: &Address, deadline: Instant, timeout: Duration) -> Result<(Sock, String)> {
    let name = addr.to_string();
    let io_err = |source| TransportError::Io { op: "connect to", addr: name.clone(), source };
    let timed_out = || TransportError::Timeout { op: "connect to", addr: name.clone(), after: timeout };
    match addr {
        Address::Tcp { port: 0, .. } => {
            Err(TransportError::BadAddress { input: name.clone(), reason: "port 0 can only be listened on".into() })
        }
        Address::Tcp { host, port } => {
            // Name resolution (getaddrinfo) has no timeout of its own; it is
            // local for IP addresses and /etc/hosts names.
            let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs().map_err(io_err)?.collect();
            let mut last = None;
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                match TcpStream::connect_timeout(&a, left) {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(io_err)?;
                        let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_else(|_| a.to_string());
                        return Ok((Sock::Tcp(s), peer));
                    }
                    Err(e) => last = Some(e),
                }
            }
            match last {
                Some(e) if is_timeout(&e) => Err(timed_out()),
                Some(e) => Err(io_err(e)),
                None => Err(io_err(io::Error::new(io::ErrorKind::NotFound, "host has no addresses"))),
            }
        }
        Address::Unix(path) => match unix_connect(path, deadline) {
            Ok(s) => Ok((Sock::Unix(s), name.clone())),
            Err(e) if is_timeout(&e) => Err(timed_out()),
            Err(e) => Err(io_err(e)),
        },
    }
}

/// Connect a unix stream socket without blocking past `deadline`: std's
/// connect blocks while the listener's backlog is full, so this uses a
/// non-blocking socket, on which Linux answers EAGAIN instead, and retries.
fn unix_connect(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "unusable unix socket path"));
    }
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Bounded by the deadline: each pass sleeps at most 5 ms and stops once it passes.
    loop {
        // SAFETY: sun is a valid sockaddr_un and len does not exceed its size.
        let r = unsafe { libc::connect(fd.as_raw_fd(), (&sun as *const libc::sockaddr_un).cast(), len) };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "listener backlog full"));
                }
                std::thread::sleep(left.min(Duration::from_millis(5)));
            }
            _ => return Err(e),
        }
    }
    let s = UnixStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::thread;
    use std::time::SystemTime;

    use super::*;
    use crate::certs;

    const T: Duration = Duration::from_secs(10);
    const MIB: usize = 1 << 20;

    /// A CA in a temporary directory with certificates for `names`.
    fn pki(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        certs::init_ca(dir.path()).unwrap();
        for n in names {
            certs::issue(dir.path(), n).unwrap();
        }
        dir
    }

    fn expired(dir: &Path, name: &str) {
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        certs::issue_with_validity(dir, name, now - 3 * day, now - day).unwrap();
    }

    fn loopback() -> Address {
        "tcp://127.0.0.1:0".parse().unwrap()
    }

    fn tls_server(dir: &Path, name: &str, allowed: &[&str]) -> Listener {
        let security = Security::Tls {
            config: TlsConfig::in_dir(dir, name),
            allowed_peers: allowed.iter().map(|s| s.to_string()).collect(),
        };
        Listener::bind(&loopback(), security).unwrap()
    }

    type Accepted = Result<(Transport, PeerInfo)>;

    /// Accept one connection on a thread (bounded by the accept and handshake timeouts).
    fn serve(listener: Listener) -> thread::JoinHandle<(Listener, Accepted)> {
        thread::spawn(move || {
            let r = listener.accept(T);
            (listener, r)
        })
    }

    fn tls_client(dir: &Path, name: &str) -> ClientSecurity {
        ClientSecurity::Tls(TlsConfig::in_dir(dir, name))
    }

    fn byte(seed: u8, i: usize) -> u8 {
        ((i ^ (i >> 9) ^ (i >> 17)) as u8).wrapping_mul(167).wrapping_add(seed)
    }

    fn send(w: &mut TransportWriter, seed: u8, len: usize) {
        let mut off = 0;
        // Odd write sizes so records and chunks do not line up with anything.
        let mut buf = vec![0u8; 300_007];
        while off < len {
            let n = buf.len().min(len - off);
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = byte(seed, off + k);
            }
            w.write_all(&buf[..n]).unwrap();
            off += n;
        }
        w.shutdown().unwrap();
    }

    fn recv(r: &mut TransportReader, seed: u8, len: usize) {
        let mut buf = vec![0u8; 65_521];
        let mut off = 0;
        while off < len {
            let want = buf.len().min(len - off);
            let n = r.read(&mut buf[..want]).unwrap();
            assert!(n > 0, "stream ended at {off} of {len}");
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, byte(seed, off + k), "byte {}", off + k);
            }
            off += n;
        }
        // The peer's shutdown is a clean end of stream (close_notify for TLS).
        assert_eq!(r.read(&mut buf).unwrap(), 0);
    }

    /// Send `len` bytes each way at the same time, from four threads.
    fn exchange(a: Transport, b: Transport, len: usize) {
        for t in [&a, &b] {
            t.set_timeouts(Some(Duration::from_secs(60)), Some(Duration::from_secs(60))).unwrap();
        }
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        thread::scope(|s| {
            s.spawn(move || send(&mut aw, 1, len));
            s.spawn(move || send(&mut bw, 2, len));
            s.spawn(move || recv(&mut br, 1, len));
            recv(&mut ar, 2, len);
        });
    }

    fn tls_err(e: TransportError) -> TlsFailure {
        match e {
            TransportError::Tls { failure, .. } => failure,
            other => panic!("expected a TLS failure, got: {other}"),
        }
    }

    #[test]
    fn mutual_tls_round_trip_both_directions() {
        let dir = pki(&["src", "dst"]);
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let client = connect(&addr, &tls_client(dir.path(), "src"), "dst", T).unwrap();
        let (_l, accepted) = server.join().unwrap();
        let (served, info) = accepted.unwrap();
        assert_eq!(info.name.as_deref(), Some("src"));
        assert_eq!(served.peer_name(), Some("src"));
        assert_eq!(client.peer_name(), Some("dst"));
        assert_eq!((client.kind(), served.kind()), (TransportKind::Tls, TransportKind::Tls));
        assert!(client.cipher_suite().unwrap().starts_with("TLS13_"), "{:?}", client.cipher_suite());
        exchange(client, served, 6 * MIB + 12_345);
    }

    #[test]
    fn tls_over_unix_socket_and_default_peer_name_is_host() {
        let dir = pki(&["src", "localhost"]);
        let sock = dir.path().join("m.sock");
        let addr = Address::Unix(sock.clone());
        let security =
            Security::Tls { config: TlsConfig::in_dir(dir.path(), "localhost"), allowed_peers: vec!["src".into()] };
        let server = serve(Listener::bind(&addr, security).unwrap());
        let client = connect(&addr, &tls_client(dir.path(), "src"), "localhost", T).unwrap();
        let (listener, accepted) = server.join().unwrap();
        exchange(client, accepted.unwrap().0, MIB);
        drop(listener);
        assert!(!sock.exists(), "the listener removes its socket file");

        // tcp://localhost:PORT checks the server's certificate against "localhost".
        let listener = Listener::bind(
            &"tcp://localhost:0".parse().unwrap(),
            Security::Tls { config: TlsConfig::in_dir(dir.path(), "localhost"), allowed_peers: vec!["src".into()] },
        )
        .unwrap();
        let addr = listener.local_addr();
        let server = serve(listener);
        let client = connect(&addr, &tls_client(dir.path(), "src"), addr.host().unwrap(), T).unwrap();
        assert_eq!(client.peer_name(), Some("localhost"));
        server.join().unwrap().1.unwrap();
    }

    #[test]
    fn client_without_certificate_is_refused() {
        let dir = pki(&["src", "dst"]);
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let Address::Tcp { port, .. } = listener.local_addr() else { unreachable!() };
        let server = serve(listener);
        // A rustls client that trusts the CA but has no certificate.
        let m = TlsConfig::in_dir(dir.path(), "src").load().unwrap();
        let p = Arc::new(provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(m.roots, p.clone()).build().unwrap();
        let config = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        let mut conn =
            Connection::Client(ClientConnection::new(Arc::new(config), ServerName::try_from("dst").unwrap()).unwrap());
        let sock = Sock::Tcp(TcpStream::connect(("127.0.0.1", port)).unwrap());
        let deadline = Instant::now() + T;
        let r = drive_handshake(&mut conn, &sock, deadline)
            .and_then(|()| read_plain_exact(&mut conn, &sock, &mut [0u8; 8], deadline));
        let client_failure = tls_err(hs_error(r.expect_err("refused"), "server", T, Some("dst"), None));
        assert!(
            matches!(&client_failure, TlsFailure::RefusedByPeer { alert, .. } if alert == "CertificateRequired"),
            "{client_failure}"
        );
        let e = server.join().unwrap().1.unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        assert_eq!(tls_err(e), TlsFailure::NoCertificate);
    }

    #[test]
    fn client_certificate_from_another_ca_is_refused() {
        let dir = pki(&["src", "dst"]);
        let other = pki(&["src"]);
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        // Trusts the right CA (so it accepts the server) but its own certificate is foreign.
        let config = TlsConfig { ca: dir.path().join("ca.pem"), ..TlsConfig::in_dir(other.path(), "src") };
        let e = connect(&addr, &ClientSecurity::Tls(config), "dst", T).unwrap_err();
        let f = tls_err(e);
        assert!(matches!(&f, TlsFailure::RefusedByPeer { alert, .. } if alert == "UnknownCA"), "{f}");
        let e = server.join().unwrap().1.unwrap_err();
        assert!(e.to_string().contains("unknown CA"), "{e}");
        assert_eq!(tls_err(e), TlsFailure::UnknownCa);
    }

    #[test]
    fn server_name_mismatch_is_refused_by_the_client() {
        let dir = pki(&["src", "dst"]);
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let e = connect(&addr, &tls_client(dir.path(), "src"), "elsewhere", T).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("elsewhere") && msg.contains("dst") && msg.contains("mismatch"), "{msg}");
        assert_eq!(
            tls_err(e),
            TlsFailure::NameMismatch { expected: "elsewhere".into(), presented: vec!["dst".into()] }
        );
        let f = tls_err(server.join().unwrap().1.unwrap_err());
        assert!(matches!(&f, TlsFailure::RefusedByPeer { alert, .. } if alert == "BadCertificate"), "{f}");
    }

    #[test]
    fn peer_not_in_allow_list_is_refused_by_name() {
        let dir = pki(&["src", "dst", "intruder"]);
        let listener = tls_server(dir.path(), "dst", &["src", "src2"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let e = connect(&addr, &tls_client(dir.path(), "intruder"), "dst", T).unwrap_err();
        let f = tls_err(e);
        assert!(matches!(&f, TlsFailure::RefusedByPeer { alert, .. } if alert == "AccessDenied"), "{f}");
        let (listener, accepted) = server.join().unwrap();
        let e = accepted.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("\"intruder\"") && msg.contains("\"src\"") && msg.contains("\"src2\""), "{msg}");
        assert_eq!(
            tls_err(e),
            TlsFailure::PeerNotAllowed {
                presented: vec!["intruder".into()],
                allowed: vec!["src".into(), "src2".into()]
            }
        );
        // The listener survives a refused peer and accepts the allowed one next.
        let server = serve(listener);
        connect(&addr, &tls_client(dir.path(), "src"), "dst", T).unwrap();
        assert_eq!(server.join().unwrap().1.unwrap().1.name.as_deref(), Some("src"));
    }

    #[test]
    fn expired_certificates_are_refused() {
        let dir = pki(&["src", "dst"]);
        expired(dir.path(), "src-old");
        expired(dir.path(), "dst-old");
        // An expired client certificate, refused by the server.
        let listener = tls_server(dir.path(), "dst", &["src-old"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let f = tls_err(connect(&addr, &tls_client(dir.path(), "src-old"), "dst", T).unwrap_err());
        assert!(matches!(&f, TlsFailure::RefusedByPeer { alert, .. } if alert == "CertificateExpired"), "{f}");
        let e = server.join().unwrap().1.unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(matches!(tls_err(e), TlsFailure::Expired { not_after: Some(_) }));
        // An expired server certificate, refused by the client.
        let listener = tls_server(dir.path(), "dst-old", &["src"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let e = connect(&addr, &tls_client(dir.path(), "src"), "dst-old", T).unwrap_err();
        assert!(e.to_string().contains("has expired (valid until "), "{e}");
        assert!(matches!(tls_err(e), TlsFailure::Expired { .. }));
        let f = tls_err(server.join().unwrap().1.unwrap_err());
        assert!(matches!(&f, TlsFailure::RefusedByPeer { alert, .. } if alert == "CertificateExpired"), "{f}");
    }

    #[test]
    fn insecure_tcp_and_unix_round_trips() {
        let listener = Listener::bind(&loopback(), Security::Insecure).unwrap();
        let addr = listener.local_addr();
        let server = serve(listener);
        let client = connect(&addr, &ClientSecurity::Insecure, "", T).unwrap();
        let (served, info) = server.join().unwrap().1.unwrap();
        assert_eq!(info.name, None);
        assert!(info.addr.starts_with("127.0.0.1:"), "{}", info.addr);
        assert_eq!(client.kind(), TransportKind::Tcp);
        exchange(client, served, 4 * MIB + 1);

        let dir = tempfile::tempdir().unwrap();
        let addr = Address::Unix(dir.path().join("plain.sock"));
        let server = serve(Listener::bind(&addr, Security::Insecure).unwrap());
        let client = connect(&addr, &ClientSecurity::Insecure, "", T).unwrap();
        let served = server.join().unwrap().1.unwrap().0;
        assert_eq!(served.kind(), TransportKind::Unix);
        exchange(client, served, 4 * MIB + 1);
    }

    #[test]
    fn truncated_tls_stream_is_an_error_not_an_end() {
        let dir = pki(&["src", "dst"]);
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let mut client = connect(&addr, &tls_client(dir.path(), "src"), "dst", T).unwrap();
        let mut served = server.join().unwrap().1.unwrap().0;
        served.set_timeouts(Some(T), Some(T)).unwrap();
        client.write_all(b"hello").unwrap();
        // Closing the socket without close_notify: the reader must not take it for a clean end.
        let Sock::Tcp(s) = &client.reader.shared.sock else { unreachable!() };
        s.shutdown(Shutdown::Both).unwrap();
        let mut buf = [0u8; 5];
        served.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let e = served.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn read_timeout_applies_to_tls_reads() {
        let dir = pki(&["src", "dst"]);
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let addr = listener.local_addr();
        let server = serve(listener);
        let mut client = connect(&addr, &tls_client(dir.path(), "src"), "dst", T).unwrap();
        let _served = server.join().unwrap().1.unwrap();
        client.set_timeouts(Some(Duration::from_millis(200)), None).unwrap();
        let t0 = Instant::now();
        let e = client.read(&mut [0u8; 16]).unwrap_err();
        assert!(is_timeout(&e), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn connects_accepts_and_handshakes_are_bounded() {
        let dir = pki(&["src", "dst"]);
        let short = Duration::from_millis(300);
        let bound = Duration::from_secs(5);

        // A TLS listener that never accepts: TCP connects (the kernel's
        // backlog), the handshake gets no answer and times out.
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let t0 = Instant::now();
        let e = connect(&listener.local_addr(), &tls_client(dir.path(), "src"), "dst", short).unwrap_err();
        assert!(matches!(e, TransportError::Timeout { op: "TLS handshake with", .. }), "{e}");
        assert!(t0.elapsed() < bound);

        // Accepting with nobody connecting (a fresh listener: the one above
        // still holds the timed-out client in its backlog).
        let listener = tls_server(dir.path(), "dst", &["src"]);
        let t0 = Instant::now();
        let e = listener.accept(short).unwrap_err();
        assert!(matches!(e, TransportError::Timeout { op: "accept on", .. }), "{e}");
        assert!(t0.elapsed() < bound);

        // A client that connects and says nothing holds accept only for the handshake timeout.
        let mut listener = tls_server(dir.path(), "dst", &["src"]);
        listener.set_handshake_timeout(short);
        let Address::Tcp { port, .. } = listener.local_addr() else { unreachable!() };
        let _silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let t0 = Instant::now();
        let e = listener.accept(T).unwrap_err();
        assert!(matches!(e, TransportError::Timeout { op: "TLS handshake with", .. }), "{e}");
        assert!(t0.elapsed() < bound);

        // A TCP listener whose backlog is full: the SYN goes unanswered and
        // connect times out (backlog 0 admits one connection).
        let full = Listener::bind(&loopback(), Security::Insecure).unwrap();
        // SAFETY: listen(2) on a socket we own, to shrink its backlog.
        assert_eq!(unsafe { libc::listen(full.raw_fd(), 0) }, 0);
        let mut held = Vec::new();
        let mut timed_out = false;
        let t0 = Instant::now();
        for _ in 0..16 {
            match connect(&full.local_addr(), &ClientSecurity::Insecure, "", Duration::from_millis(200)) {
                Ok(t) => held.push(t),
                Err(TransportError::Timeout { op: "connect to", .. }) => {
                    timed_out = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(timed_out, "{} connections got through a full backlog", held.len());
        assert!(t0.elapsed() < bound);

        // The same for a unix socket (where std's connect would block).
        let sock_dir = tempfile::tempdir().unwrap();
        let full = Listener::bind(&Address::Unix(sock_dir.path().join("full.sock")), Security::Insecure).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::listen(full.raw_fd(), 0) }, 0);
        let mut timed_out = false;
        let t0 = Instant::now();
        for _ in 0..16 {
            match connect(&full.local_addr(), &ClientSecurity::Insecure, "", Duration::from_millis(200)) {
                Ok(t) => held.push(t),
                Err(TransportError::Timeout { op: "connect to", .. }) => {
                    timed_out = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(timed_out);
        assert!(t0.elapsed() < bound);
    }

    #[test]
    fn addresses_parse_display_and_refuse_bad_input() {
        for (s, want) in [
            ("tcp://127.0.0.1:4444", Address::Tcp { host: "127.0.0.1".into(), port: 4444 }),
            ("tcp://dst.example:1", Address::Tcp { host: "dst.example".into(), port: 1 }),
            ("tcp://[::1]:80", Address::Tcp { host: "::1".into(), port: 80 }),
            ("unix:///run/ferry/m.sock", Address::Unix("/run/ferry/m.sock".into())),
        ] {
            let a: Address = s.parse().unwrap();
            assert_eq!(a, want);
            assert_eq!(a.to_string(), s);
        }
        assert_eq!("tcp://[::1]:80".parse::<Address>().unwrap().host(), Some("::1"));
        for (s, why) in [
            ("tcp://", "missing HOST:PORT"),
            ("tcp://host", "missing :PORT"),
            ("tcp://host:", "missing PORT"),
            ("tcp://:4444", "missing HOST"),
            ("tcp://host:99999", "not a number from 0 to 65535"),
            ("tcp://host:http", "not a number"),
            ("tcp://::1:80", "needs brackets"),
            ("tcp://[::1]", "missing :PORT"),
            ("tcp://[nope]:1", "not an IPv6 address"),
            ("tcp://host:1/path", "no path"),
            ("tcp://ho st:1", "character ' '"),
            ("udp://x", "unknown scheme \"udp\""),
            ("unix://", "missing socket path"),
            ("127.0.0.1:4444", "expected tcp://HOST:PORT or unix://PATH"),
            ("", "expected tcp://"),
        ] {
            let e = s.parse::<Address>().unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, TransportError::BadAddress { .. }), "{s}: {msg}");
            assert!(msg.contains(why) && msg.contains(&format!("{s:?}")), "{s}: {msg}");
        }
        let long = format!("unix:///{}", "x".repeat(MAX_UNIX_PATH));
        assert!(long.parse::<Address>().unwrap_err().to_string().contains("at most 107"));
        let e = connect(&"tcp://127.0.0.1:0".parse().unwrap(), &ClientSecurity::Insecure, "", T).unwrap_err();
        assert!(e.to_string().contains("port 0"), "{e}");
    }

    #[test]
    fn unusable_tls_files_are_named() {
        let dir = pki(&["src", "dst"]);
        let d = dir.path();
        let good = TlsConfig::in_dir(d, "src");
        good.validate().unwrap();
        let check = |config: TlsConfig, path: &Path, why: &str| {
            let e = config.validate().unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, TransportError::File { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()) && msg.contains(why), "{msg}");
        };
        let missing = d.join("missing.pem");
        check(TlsConfig { cert: missing.clone(), ..good.clone() }, &missing, "cannot open");
        let empty = d.join("empty.pem");
        fs_write(&empty, b"\n");
        check(TlsConfig { ca: empty.clone(), ..good.clone() }, &empty, "is empty");
        let text = d.join("text.pem");
        fs_write(&text, b"hello, not a certificate\n");
        check(TlsConfig { cert: text.clone(), ..good.clone() }, &text, "no PEM CERTIFICATE block");
        check(TlsConfig { key: text.clone(), ..good.clone() }, &text, "no private key");
        // The certificate where the key should be.
        check(TlsConfig { key: good.cert.clone(), ..good.clone() }, &good.cert, "no private key");
        let broken = d.join("broken.pem");
        fs_write(&broken, b"-----BEGIN CERTIFICATE-----\nAAAA\n");
        check(TlsConfig { cert: broken.clone(), ..good.clone() }, &broken, "not valid PEM");
        check(TlsConfig { ca: d.to_path_buf(), ..good.clone() }, d, "not a regular file");
        let big = d.join("big.pem");
        fs_write(&big, &vec![b'A'; 2 * MIB]);
        check(TlsConfig { ca: big.clone(), ..good.clone() }, &big, "at most 1048576");
        // A FIFO is refused without blocking on open.
        let fifo = d.join("fifo.pem");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        check(TlsConfig { key: fifo.clone(), ..good.clone() }, &fifo, "not a regular file");
        // The key of another certificate.
        let wrong = TlsConfig { key: d.join("dst.key"), ..good.clone() };
        check(wrong.clone(), &wrong.key, "does not fit certificate");
        let e = Listener::bind(&loopback(), Security::Tls { config: wrong, allowed_peers: vec!["src".into()] });
        assert!(e.unwrap_err().to_string().contains("does not fit"));
        // A listener needs an allow-list.
        let e = Listener::bind(&loopback(), Security::Tls { config: good.clone(), allowed_peers: vec![] });
        assert!(matches!(e.unwrap_err(), TransportError::Config(m) if m.contains("allowed peer")));
        // An unusable peer name is refused before connecting.
        let e = connect(&loopback(), &ClientSecurity::Tls(good), "bad name", T).unwrap_err();
        assert!(e.to_string().contains("\"bad name\""), "{e}");
    }

    fn fs_write(path: &Path, data: &[u8]) {
        std::fs::write(path, data).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn stale_unix_sockets_are_replaced_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        drop(UnixListener::bind(&path).unwrap()); // std leaves the file behind
        assert!(path.exists());
        let l = Listener::bind(&Address::Unix(path.clone()), Security::Insecure).unwrap();
        // A second listener on a live socket is refused.
        let e = Listener::bind(&Address::Unix(path.clone()), Security::Insecure).unwrap_err();
        assert!(e.to_string().contains("another process is listening"), "{e}");
        drop(l);
        let file = dir.path().join("regular");
        std::fs::write(&file, b"x").unwrap();
        let e = Listener::bind(&Address::Unix(file.clone()), Security::Insecure).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(file.exists());
    }
}

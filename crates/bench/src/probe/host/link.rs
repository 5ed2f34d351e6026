//! The loopback link a local migration runs over, measured with ferry's own
//! transports (unix socket, plain TCP with `TCP_NODELAY`, TLS 1.3 with mutual
//! authentication) as a plain bulk copy between two threads: nothing but the
//! socket (and for TLS the cipher) between a writer and a reader. A
//! migration's total time can then be stated against "its bytes at the speed
//! of the link".

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_migrate::transport::{self, Address, ClientSecurity, Security, TlsConfig};
use serde::Serialize;

/// Which stream a migration (or the link probe) uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Link {
    /// A unix stream socket.
    Unix,
    /// Plain TCP on 127.0.0.1 (`--insecure`).
    Tcp,
    /// TLS 1.3 with mutual authentication over TCP on 127.0.0.1.
    Tls,
}

impl Link {
    /// Its name on the bench's command line and in tables.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Link::Unix => "unix",
            Link::Tcp => "tcp",
            Link::Tls => "tls",
        }
    }

    /// Parses `unix`, `tcp` or `tls`.
    pub(crate) fn parse(s: &str) -> Result<Link, String> {
        match s {
            "unix" => Ok(Link::Unix),
            "tcp" => Ok(Link::Tcp),
            "tls" => Ok(Link::Tls),
            _ => Err(format!("unknown transport {s:?}: use unix, tcp or tls")),
        }
    }
}

/// One bulk copy over one link.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct LinkSample {
    /// The link.
    pub(crate) link: Link,
    /// Bytes copied.
    pub(crate) bytes: u64,
    /// From the first write to the reader having read the last byte.
    pub(crate) ms: f64,
    /// bytes / ms.
    pub(crate) gb_per_s: f64,
}

/// Copies `bytes` from one thread to another over `link` in 1 MiB writes and
/// times it. TLS uses the certificates `ferry certs` wrote in `pki`
/// (`src` for the client, `127.0.0.1` for the server), as the bench's TLS
/// migrations do.
pub(crate) fn bulk_copy(link: Link, dir: &Path, pki: &Path, bytes: u64) -> Result<LinkSample> {
    let (listen, security, client) = match link {
        Link::Unix => {
            let p = dir.join("link-probe.sock");
            (Address::Unix(p), Security::Insecure, ClientSecurity::Insecure)
        }
        Link::Tcp => (tcp_any(), Security::Insecure, ClientSecurity::Insecure),
        Link::Tls => (
            tcp_any(),
            Security::Tls { config: TlsConfig::in_dir(pki, "127.0.0.1"), allowed_peers: vec!["src".into()] },
            ClientSecurity::Tls(TlsConfig::in_dir(pki, "src")),
        ),
    };
    let listener = transport::Listener::bind(&listen, security).context("link probe: binding")?;
    let addr = listener.local_addr();
    let reader = std::thread::spawn(move || -> Result<(u64, Instant)> {
        let (mut t, _) = listener.accept(Duration::from_secs(30))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = t.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
            if got >= bytes {
                break;
            }
        }
        Ok((got, Instant::now()))
    });
    let mut w =
        transport::connect(&addr, &client, "127.0.0.1", Duration::from_secs(10)).context("link probe: connecting")?;
    // Pseudo-random data: nothing on the path compresses, and TLS encrypts real bytes.
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        sent += n as u64;
    }
    w.flush()?;
    let (got, t1) = reader.join().map_err(|_| anyhow::anyhow!("link probe reader panicked"))??;
    let _ = w.shutdown();
    if got < bytes {
        bail!("link probe over {}: the reader got {got} of {bytes} bytes", link.name());
    }
    let ms = (t1 - t0).as_secs_f64() * 1e3;
    Ok(LinkSample { link, bytes, ms, gb_per_s: crate::util::gbps(bytes as f64, ms) })
}

fn tcp_any() -> Address {
    Address::Tcp { host: "127.0.0.1".into(), port: 0 }
}

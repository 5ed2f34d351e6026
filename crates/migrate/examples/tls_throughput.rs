//! Loopback throughput of the migration transports: plain TCP, unix socket
//! and mutual TLS 1.3 (rustls, ring), sending N MiB (default 1024) in 1 MiB
//! writes from one thread to a reader thread, plus the TLS handshake time.
//!
//!     cargo run --release -p ferry-migrate --example tls_throughput [MIB]
//!
//! It answers "what does encryption cost a migration?" on this machine; the
//! figures are printed, not asserted.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use ferry_migrate::certs;
use ferry_migrate::transport::{connect, Address, ClientSecurity, Listener, Security, TlsConfig, Transport};

const MIB: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

fn pair(addr: &Address, server: Security, client: &ClientSecurity, peer: &str) -> (Transport, Transport) {
    let listener = Listener::bind(addr, server).expect("bind");
    let addr = listener.local_addr();
    let accept = thread::spawn(move || listener.accept(TIMEOUT).expect("accept").0);
    let c = connect(&addr, client, peer, TIMEOUT).expect("connect");
    (c, accept.join().expect("accept thread"))
}

/// Seconds to move `mib` MiB from `tx` to `rx`, measured until the reader has it all.
fn transfer(mut tx: Transport, mut rx: Transport, mib: usize) -> f64 {
    for t in [&tx, &rx] {
        t.set_timeouts(Some(TIMEOUT), Some(TIMEOUT)).expect("timeouts");
    }
    let total = mib * MIB;
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; MIB];
        let mut got = 0;
        while got < total {
            let n = rx.read(&mut buf).expect("read");
            assert!(n > 0, "stream ended early");
            got += n;
        }
        Instant::now()
    });
    // Not all zeros, so nothing along the way could take a shortcut.
    let buf: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4093) as u8).collect();
    let start = Instant::now();
    for _ in 0..mib {
        tx.write_all(&buf).expect("write");
    }
    let end = reader.join().expect("reader thread");
    let _ = tx.shutdown();
    end.duration_since(start).as_secs_f64()
}

fn report(what: &str, mib: usize, secs: f64) {
    println!(
        "{what:<28} {mib:>6} MiB in {secs:>7.3} s = {:>8.1} MiB/s ({:.2} Gbit/s)",
        mib as f64 / secs,
        mib as f64 * 8.0 * 1.048576 / 1000.0 / secs
    );
}

fn main() {
    let mib: usize = std::env::args().nth(1).map(|a| a.parse().expect("MIB must be a number")).unwrap_or(1024);
    let dir = tempfile::tempdir().expect("tempdir");
    certs::init_ca(dir.path()).expect("init CA");
    for name in ["src", "dst"] {
        certs::issue(dir.path(), name).expect("issue");
    }
    let tcp: Address = "tcp://127.0.0.1:0".parse().expect("address");
    let unix = Address::Unix(dir.path().join("bench.sock"));
    let server_tls =
        || Security::Tls { config: TlsConfig::in_dir(dir.path(), "dst"), allowed_peers: vec!["src".to_string()] };
    let client_tls = ClientSecurity::Tls(TlsConfig::in_dir(dir.path(), "src"));

    // Handshake: connect() returns after the full mutual handshake and the server's confirmation.
    let rounds = 20;
    let listener = Listener::bind(&tcp, server_tls()).expect("bind");
    let addr = listener.local_addr();
    let server = thread::spawn(move || {
        for _ in 0..rounds {
            listener.accept(TIMEOUT).expect("accept");
        }
    });
    let mut times: Vec<f64> = (0..rounds)
        .map(|_| {
            let t0 = Instant::now();
            drop(connect(&addr, &client_tls, "dst", TIMEOUT).expect("connect"));
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    server.join().expect("server thread");
    times.sort_by(f64::total_cmp);
    println!("TLS 1.3 mutual handshake     median {:.2} ms, max {:.2} ms over {rounds} connections (includes reading the PEM files)", times[rounds / 2], times[rounds - 1]);

    let (c, s) = pair(&tcp, Security::Insecure, &ClientSecurity::Insecure, "");
    report("plain TCP (insecure)", mib, transfer(c, s, mib));
    let (c, s) = pair(&unix, Security::Insecure, &ClientSecurity::Insecure, "");
    report("unix socket", mib, transfer(c, s, mib));
    let (c, s) = pair(&tcp, server_tls(), &client_tls, "dst");
    let cipher = c.cipher_suite().unwrap_or_default();
    report("TLS 1.3 over TCP", mib, transfer(c, s, mib));
    println!("(TLS cipher suite {cipher}; one sender thread, one receiver thread, both on this machine)");
}

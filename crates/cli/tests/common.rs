//! Helpers for end-to-end tests that drive the real `ferry` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn ferry() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Timeouts scale with FERRY_TEST_TIMEOUT_SCALE on slow hosts.
pub fn secs(s: u64) -> Duration {
    let scale: f64 = std::env::var("FERRY_TEST_TIMEOUT_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    Duration::from_secs_f64(s as f64 * scale)
}

/// A `ferry run` child whose serial output is collected line by line.
pub struct Guest {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    pub stderr: Receiver<String>,
    pub dir: tempfile::TempDir,
}

impl Guest {
    /// Starts `ferry run` with the given extra arguments (after `run`).
    pub fn start(args: &[&str]) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, args)
    }

    /// Same, in a given temporary directory.
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Guest {
        Self::spawn(dir, "run", args)
    }

    /// `ferry restore` with the given arguments.
    pub fn start_restore(dir: tempfile::TempDir, args: &[&str]) -> Guest {
        Self::spawn(dir, "restore", args)
    }

    /// `ferry receive` with the given arguments.
    pub fn start_receive(dir: tempfile::TempDir, args: &[&str]) -> Guest {
        Self::spawn(dir, "receive", args)
    }

    /// Waits for a stderr line containing `needle` (stderr is collected apart from serial output).
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no stderr line with {needle:?} in time"),
            }
        }
    }

    fn spawn(dir: tempfile::TempDir, cmd: &str, args: &[&str]) -> Guest {
        let mut child = Command::new(ferry())
            .arg(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                eprintln!("[ferry stderr] {l}");
                if etx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Guest { child, stdin, lines, seen: vec![], stderr, dir }
    }

    /// Path inside this guest's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for a serial line matching `pred`; panics with what was seen on timeout.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}; last lines: {:?}", self.tail()),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "ferry exited while waiting for {what}; last lines: {:?}; stderr: {:?}",
                        self.tail(),
                        self.stderr_lines()
                    )
                }
            }
        }
    }

    /// Waits for a line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.wait_for(prefix, timeout, |l| l.starts_with(prefix))
    }

    /// Lines that arrive within `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut got = vec![];
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(l.clone());
            got.push(l);
        }
        got
    }

    /// Types a line on the serial console.
    pub fn send_line(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{s}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Drain remaining output.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ferry did not exit in time; last lines: {:?}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything ferry printed on stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    fn tail(&self) -> Vec<String> {
        self.seen.iter().rev().take(8).rev().cloned().collect()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a ferry subcommand to completion.
pub fn ferry_cmd(args: &[&str]) -> std::process::Output {
    Command::new(ferry()).args(args).stdin(Stdio::null()).output().expect("run ferry")
}

/// Runs a CLI command against an API socket and parses its JSON output.
pub fn api(cmd: &str, sock: &Path) -> serde_json::Value {
    let out = ferry_cmd(&[cmd, "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "ferry {cmd} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Waits until the API socket accepts connections.
pub fn wait_sock(sock: &Path) {
    let deadline = Instant::now() + secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "API socket {} never came up", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Value of `key=` in a serial line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).and_then(|v| v.parse().ok())
}

/// Sends raw bytes to a unix socket and returns the raw response.
pub fn raw_http(sock: &Path, req: &[u8]) -> String {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(req).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A running test guest with an API socket: started, first PROGRESS seen, socket up.
pub fn running_guest(cmdline: &str, mem: &str) -> (Guest, PathBuf) {
    running_guest_with(cmdline, mem, &[])
}

/// Same, with extra `ferry run` flags (e.g. `--vcpus 2`).
pub fn running_guest_with(cmdline: &str, mem: &str, extra: &[&str]) -> (Guest, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut args =
        vec!["--kernel", "builtin:test", "--mem", mem, "--cmdline", cmdline, "--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut g = Guest::start_in(dir, &args);
    g.wait_line("PROGRESS", secs(60));
    wait_sock(&sock);
    (g, sock)
}

/// `ferry snapshot --json` with extra flags; returns the raw output.
pub fn snapshot(sock: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["snapshot", "--api-sock", sock.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    ferry_cmd(&args)
}

/// A snapshot that must succeed; returns its statistics.
pub fn snapshot_ok(sock: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = snapshot(sock, out, extra);
    assert!(o.status.success(), "snapshot failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

// Migration tests' helpers (migration.rs, postcopy.rs).

/// A destination `ferry receive`; returns it, its API socket and the address it listens on.
pub fn receiver(listen: &str, extra: &[&str]) -> (Guest, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dst.sock");
    let listen = listen.replace("DIR", dir.path().to_str().unwrap());
    let mut args = vec!["--listen", listen.as_str(), "--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut g = Guest::start_receive(dir, &args);
    let line = g.wait_stderr("waiting for a migration on ", secs(30));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    wait_sock(&sock);
    (g, sock, addr)
}

pub fn migrate(sock: &Path, to: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["migrate", "--api-sock", sock.to_str().unwrap(), "--to", to, "--json"];
    args.extend_from_slice(extra);
    ferry_cmd(&args)
}

/// A CA in `dir` with certificates for `names`.
pub fn certs(dir: &Path, names: &[&str]) {
    let o = ferry_cmd(&["certs", "init", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in names {
        let o = ferry_cmd(&["certs", "issue", "--dir", dir.to_str().unwrap(), "--name", n]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

pub fn tls_args(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{name}.pem")).to_str().unwrap().into(),
        "--tls-key".into(),
        dir.join(format!("{name}.key")).to_str().unwrap().into(),
        "--tls-ca".into(),
        dir.join("ca.pem").to_str().unwrap().into(),
    ]
}

pub fn seqs(lines: &[String]) -> Vec<u64> {
    lines.iter().filter(|l| l.starts_with("PROGRESS")).filter_map(|l| field(l, "seq")).collect()
}

/// `GET path` on an API socket, the body as JSON (null when it is not).
pub fn http_get(sock: &Path, path: &str) -> serde_json::Value {
    let r = raw_http(sock, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    serde_json::from_str(r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("null")).unwrap_or_default()
}

/// A path as `&str`, for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Bytes as lower-case hex, as the CLI takes `--hex`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs ferry, expects success, and parses its standard output as JSON.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    let o = ferry_cmd(args);
    assert!(o.status.success(), "ferry {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

//! Files ferry reads whole (key files, kernels, initrds) are bounded: a device
//! such as /dev/zero, a FIFO, a directory or an oversized file is refused at
//! once with the path and the reason, never read until the OOM killer comes.
//!
//! Every ferry run here is watched: killed and failed if it takes longer than
//! 20 s or its resident memory passes `RSS_LIMIT`, so a regression fails the
//! test instead of taking the machine's memory.

mod common;
use common::*;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Resident memory a refused run may use (ferry's own, with no guest running).
const RSS_LIMIT: u64 = 512 << 20;

/// How a watched ferry run ended.
struct Outcome {
    code: Option<i32>,
    stderr: String,
    /// Peak resident memory of the child (from wait4's rusage), bytes.
    max_rss: u64,
    elapsed: Duration,
}

/// Resident memory of a live process, from /proc/PID/status.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb << 10)
}

/// Runs `ferry ARGS` with stdin and stdout closed, killing it (and failing
/// the test) after 20 s or once it holds more than `RSS_LIMIT`.
// The child is reaped with wait4 (for its peak RSS), not with Child::wait.
#[allow(clippy::zombie_processes)]
fn run_bounded(args: &[&str]) -> Outcome {
    let start = Instant::now();
    let mut child = Command::new(ferry())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let pid = child.id();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = start + secs(20);
    loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage; wait4 fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our unreaped child; status and ru are writable.
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut ru) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid as i32 {
            // Reaped here: std's Child must not wait for or kill it any more
            // (dropping a Child does neither).
            drop(child);
            let stderr = reader.join().unwrap();
            let out = Outcome {
                code: std::process::ExitStatus::from_raw(status).code(),
                stderr,
                max_rss: ru.ru_maxrss as u64 * 1024,
                elapsed: start.elapsed(),
            };
            eprintln!(
                "ferry {args:?}: exit {:?} after {:?}, peak RSS {} MiB: {}",
                out.code,
                out.elapsed,
                out.max_rss >> 20,
                out.stderr.trim()
            );
            assert!(!out.stderr.contains("panicked"), "ferry panicked: {}", out.stderr);
            assert!(out.max_rss < RSS_LIMIT, "ferry {args:?} peaked at {} MiB of RSS", out.max_rss >> 20);
            return out;
        }
        let held = rss(pid).unwrap_or(0);
        let late = Instant::now() > deadline;
        if held > RSS_LIMIT || late {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferry {args:?} killed: {} after {:?} with {} MiB resident",
                if late { "did not exit in time" } else { "memory kept growing" },
                start.elapsed(),
                held >> 20
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A watched run that must fail with exit status 1 and say all of `needles`.
fn refused(args: &[&str], needles: &[&str]) -> Outcome {
    let out = run_bounded(args);
    assert_eq!(out.code, Some(1), "ferry {args:?} must exit 1: {}", out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "ferry {args:?}: stderr lacks {n:?}: {}", out.stderr);
    }
    assert!(out.elapsed < secs(10), "ferry {args:?} took {:?} to refuse", out.elapsed);
    out
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

#[test]
fn kernel_dev_zero_is_refused() {
    refused(&["run", "--kernel", "/dev/zero"], &["kernel /dev/zero is a character device, not a regular file"]);
}

#[test]
fn kernel_fifo_directory_and_sparse_giant_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("kernel.fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    refused(&["run", "--kernel", f], &[&format!("kernel {f} is a FIFO (named pipe), not a regular file")]);
    let d = dir.path().to_str().unwrap();
    refused(&["run", "--kernel", d], &[&format!("kernel {d} is a directory, not a regular file")]);
    // 64 GiB, sparse: refused from its size, never read.
    let big = dir.path().join("big.elf");
    std::fs::File::create(&big).unwrap().set_len(64 << 30).unwrap();
    let b = big.to_str().unwrap();
    refused(
        &["run", "--kernel", b, "--mem", "64M"],
        &[&format!("kernel {b} is 68719476736 bytes"), "larger than guest memory"],
    );
}

#[test]
fn initrd_dev_zero_is_refused() {
    refused(
        &["run", "--kernel", "builtin:test", "--initrd", "/dev/zero"],
        &["initrd /dev/zero is a character device, not a regular file"],
    );
}

#[test]
fn initrd_fifo_and_sparse_giant_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("initrd.fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    refused(
        &["run", "--kernel", "builtin:test", "--initrd", f],
        &[&format!("initrd {f} is a FIFO (named pipe), not a regular file")],
    );
    let big = dir.path().join("big.initrd");
    std::fs::File::create(&big).unwrap().set_len(64 << 30).unwrap();
    let b = big.to_str().unwrap();
    refused(
        &["run", "--kernel", "builtin:test", "--mem", "64M", "--initrd", b],
        &[&format!("initrd {b} (68719476736 bytes) does not fit")],
    );
}

/// Key files, on every path that reads one: `ferry snapshot --encrypt
/// --key-file` (read by the VM's API server from `key_file`), `ferry restore
/// --key-file` and `ferry image inspect|verify --key-file`.
#[test]
fn bad_key_files_are_refused_everywhere() {
    let (g, sock) = running_guest("dirty wss=4 rate=10000 report=100", "64M");
    let s = sock.to_str().unwrap();
    let key = g.path("key");
    std::fs::write(&key, b"correct horse battery staple").unwrap();
    let img = g.path("enc.img");
    snapshot_ok(&sock, &img, &["--encrypt", "--key-file", key.to_str().unwrap()]);
    let i = img.to_str().unwrap();

    let big = g.path("big.key");
    std::fs::write(&big, vec![b'k'; 4097]).unwrap();
    let big = big.to_str().unwrap();
    let empty = g.path("empty.key");
    std::fs::write(&empty, b"").unwrap();
    let empty = empty.to_str().unwrap();
    let fifo = g.path("key.fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let dir = g.dir.path().to_str().unwrap().to_string();
    let bad: Vec<(&str, String)> = vec![
        ("/dev/zero", "key file /dev/zero is a character device, not a regular file".into()),
        (big, format!("key file {big} is 4097 bytes, more than the 4096 bytes a key file may have")),
        (empty, format!("key file {empty} is empty")),
        (fifo, format!("key file {fifo} is a FIFO (named pipe), not a regular file")),
        (&dir, format!("key file {dir} is a directory, not a regular file")),
    ];

    for (k, why) in &bad {
        // Through the API: the request is refused, nothing is written, the guest runs on.
        let out_img = g.path("never.img");
        let o = out_img.to_str().unwrap();
        refused(&["snapshot", "--api-sock", s, "--out", o, "--encrypt", "--key-file", k], &[why]);
        assert!(!out_img.exists(), "a refused snapshot writes no image");
        assert_eq!(api("status", &sock)["state"], "running", "a refused snapshot leaves the guest running");

        refused(&["restore", i, "--serial", "none", "--key-file", k], &[why]);
        refused(&["image", "inspect", i, "--key-file", k], &[why]);
        refused(&["image", "verify", i, "--key-file", k], &[why]);
    }

    // The image itself is fine: the right key reads it.
    let o = run_bounded(&["image", "inspect", i, "--json", "--key-file", key.to_str().unwrap()]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

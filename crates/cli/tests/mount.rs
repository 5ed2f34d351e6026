//! End to end: `ferry image mount` shows a snapshot of the test guest (full
//! and incremental) as files whose bytes equal `ferry image export`'s for
//! raw, ELF and LiME; registers match `ferry image inspect`; a corrupted
//! chunk gives EIO only to the reads that touch it; the mount is read-only;
//! unmounting from outside or by SIGTERM ends the process in bounded time.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `ferry image mount`; dropping it unmounts (lazily) and reaps the process,
/// so a failing test never leaves a mount behind.
struct Mounted {
    child: Child,
    dir: PathBuf,
    stderr: Receiver<String>,
}

impl Mounted {
    /// Mounts `img` on `dir` and waits (bounded) until its files appear.
    fn start(img: &Path, dir: &Path) -> Mounted {
        Self::start_with(img, dir, &[])
    }

    /// The same with extra flags (`--key-file K`).
    fn start_with(img: &Path, dir: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(ferry())
            .args(["image", "mount", s(img), s(dir), "--json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry image mount");
        let (tx, stderr) = channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                eprintln!("[mount stderr] {l}");
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut m = Mounted { child, dir: dir.to_path_buf(), stderr };
        let deadline = Instant::now() + secs(30);
        while !dir.join("info.json").exists() {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("ferry image mount exited with {st} before mounting: {:?}", m.stderr_lines());
            }
            assert!(Instant::now() < deadline, "mount did not appear in time: {:?}", m.stderr_lines());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    /// Waits (bounded) for the process to end; its status, the time taken and its JSON report.
    fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration, Value) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
                let v = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: report {out:?}"));
                return (st, t.elapsed(), v);
            }
            assert!(t.elapsed() < timeout, "ferry image mount still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("fusermount3").args(["-u", "-z", "--"]).arg(&self.dir).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("SKIP: /dev/fuse is missing, FUSE mounts cannot be tested here");
    false
}

fn ok(args: &[&str]) -> std::process::Output {
    let o = ferry_cmd(args);
    assert!(o.status.success(), "ferry {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// `ferry image export` of `img` in all three formats, into `dir`: (mount file name, exported bytes).
fn exports(img: &Path, dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    exports_with(img, dir, &[])
}

/// The same with extra flags (`--key-file K`).
fn exports_with(img: &Path, dir: &Path, extra: &[&str]) -> Vec<(&'static str, Vec<u8>)> {
    [("pmem", "raw"), ("core.elf", "elf"), ("mem.lime", "lime")]
        .into_iter()
        .map(|(name, fmt)| {
            let out = dir.join(format!("export.{fmt}"));
            let mut args = vec!["image", "export", s(img), "--format", fmt, "--out", s(&out)];
            args.extend_from_slice(extra);
            ok(&args);
            let b = std::fs::read(&out).unwrap();
            std::fs::remove_file(&out).unwrap();
            (name, b)
        })
        .collect()
}

/// A small deterministic generator for offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// SEEK_DATA / SEEK_HOLE through the mount: `Ok(offset)` or the errno.
fn seek(f: &std::fs::File, off: u64, whence: i32) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor; lseek does not touch memory.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

/// Checks every mounted file against the exports and the image's registers.
fn check_mount(m: &Mounted, img: &Path, work: &Path, chain_len: usize) {
    check_mount_with(m, img, work, chain_len, &[])
}

/// The same, reading the image with extra flags (`--key-file K`).
fn check_mount_with(m: &Mounted, img: &Path, work: &Path, chain_len: usize, extra: &[&str]) {
    for (name, want) in exports_with(img, work, extra) {
        let got = std::fs::read(m.path(name)).unwrap();
        assert_eq!(got.len(), want.len(), "{name}: size");
        assert!(got == want, "{name}: bytes differ from the export");
        let f = std::fs::File::open(m.path(name)).unwrap();
        assert_eq!(f.metadata().unwrap().len(), want.len() as u64);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ want.len() as u64);
        for _ in 0..200 {
            let off = rng.next() % (want.len() as u64 + 8192);
            let len = (rng.next() % (300 << 10)) as usize + 1;
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, off).unwrap();
            let lo = (off as usize).min(want.len());
            let hi = (off as usize + len).min(want.len());
            assert!(buf[..n] == want[lo..hi], "{name}: read of {len} at {off}: {n} bytes, {} expected", hi - lo);
        }
        // Reads at and past the end return nothing.
        assert_eq!(f.read_at(&mut [0u8; 64], want.len() as u64).unwrap(), 0);
        assert_eq!(f.read_at(&mut [0u8; 64], want.len() as u64 + (1 << 40)).unwrap(), 0);
        // Holes (SEEK_HOLE .. next SEEK_DATA) read as zero, and the data after a hole starts
        // where SEEK_DATA says; walk the whole file, bounded by the number of regions.
        let (mut at, mut regions) = (0u64, 0u32);
        while at < want.len() as u64 {
            regions += 1;
            assert!(regions < 1 << 20, "{name}: too many regions");
            let data = match seek(&f, at, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) => {
                    assert_eq!(e, libc::ENXIO, "{name}: SEEK_DATA at {at}");
                    want.len() as u64
                }
            };
            assert!(want[at as usize..data as usize].iter().all(|&b| b == 0), "{name}: hole {at}..{data} not zero");
            if data >= want.len() as u64 {
                break;
            }
            let hole = seek(&f, data, libc::SEEK_HOLE).unwrap();
            assert!(hole > data && hole <= want.len() as u64, "{name}: SEEK_HOLE {hole} after data at {data}");
            at = hole;
        }
        if name == "pmem" {
            assert!(regions > 1, "pmem of a 64 MiB guest has holes (never-written pages)");
        }
    }
    // Registers: the same as `ferry image inspect --json` says.
    let mut args = vec!["image", "inspect", s(img), "--json"];
    args.extend_from_slice(extra);
    let inspect: Value = serde_json::from_slice(&ok(&args).stdout).unwrap();
    let regs: Value = serde_json::from_slice(&std::fs::read(m.path("vcpu/0/regs.json")).unwrap()).unwrap();
    assert_eq!(regs["rip"], inspect["vcpus"][0]["rip"]);
    assert_eq!(regs["cr3"], inspect["vcpus"][0]["cr3"]);
    assert!(regs["cr3"].as_u64().unwrap() != 0);
    let info: Value = serde_json::from_slice(&std::fs::read(m.path("info.json")).unwrap()).unwrap();
    assert_eq!(info["root_hash"], inspect["root_hash"]);
    assert_eq!(info["chain"].as_array().unwrap().len(), chain_len, "{info}");
    assert_eq!(info["guest_memory_bytes"], 64u64 << 20);
    assert_eq!(info["memory_map"], inspect["header"]["ranges"]);
    let names: Vec<String> =
        std::fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    for n in ["pmem", "core.elf", "mem.lime", "info.json", "vcpu"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
}

/// A running `fill=random` guest with a full snapshot and an incremental one on top.
fn guest_with_chain() -> (Guest, tempfile::TempDir, PathBuf, PathBuf) {
    let (g, sock) = running_guest("dirty wss=4 rate=max report=200 fill=random", "64M");
    let work = tempfile::tempdir().unwrap();
    let full = work.path().join("full.img");
    let incr = work.path().join("incr.img");
    snapshot_ok(&sock, &full, &[]);
    snapshot_ok(&sock, &incr, &["--parent", s(&full)]);
    (g, work, full, incr)
}

#[test]
fn mounted_files_equal_the_exports_for_a_full_and_an_incremental_image() {
    if !fuse_available() {
        return;
    }
    let (g, work, full, incr) = guest_with_chain();
    drop(g);
    for (img, chain_len) in [(&full, 1), (&incr, 2)] {
        let mut m = Mounted::start(img, &work.path().join(format!("mnt{chain_len}")));
        check_mount(&m, img, work.path(), chain_len);
        // Unmounted from outside: the process ends by itself, promptly and successfully.
        let st = Command::new("fusermount3").args(["-u", "--"]).arg(&m.dir).status().unwrap();
        assert!(st.success(), "fusermount3 -u: {st}");
        let (st, took, report) = m.wait_exit(secs(10));
        assert!(st.success(), "{st}: {:?}", m.stderr_lines());
        assert!(took < secs(5), "took {took:?} to end after the unmount");
        assert_eq!(report["ended"]["by"], "unmounted", "{report}");
        assert!(report["reads"]["bytes"].as_u64().unwrap() >= 3 * (64 << 20), "{report}");
        assert_eq!(report["reads"]["failed_reads"], 0);
        assert!(!m.path("info.json").exists(), "still mounted");
    }
}

#[test]
fn corrupt_chunk_gives_eio_where_touched_writes_fail_and_sigterm_unmounts() {
    if !fuse_available() {
        return;
    }
    let (g, sock) = running_guest("dirty wss=4 rate=max report=200 fill=random", "64M");
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good.img");
    snapshot_ok(&sock, &good, &[]);
    drop(g);
    let want = exports(&good, work.path()).remove(1).1; // core.elf of the intact image
                                                        // Flip one byte in the middle of a copy: inside a data chunk of this incompressible image.
    let bad = work.path().join("bad.img");
    std::fs::copy(&good, &bad).unwrap();
    let mut bytes = std::fs::read(&bad).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();

    let mut m = Mounted::start(&bad, &work.path().join("mnt"));
    let f = std::fs::File::open(m.path("core.elf")).unwrap();
    let piece = 256usize << 10;
    let (mut good_pieces, mut eio) = (0, 0);
    for off in (0..want.len()).step_by(piece) {
        let mut buf = vec![0u8; piece];
        match f.read_at(&mut buf, off as u64) {
            Ok(n) => {
                let full = (off + piece).min(want.len()) - off;
                assert!(buf[..n] == want[off..off + n], "intact bytes at {off}..{}", off + n);
                if n == full {
                    good_pieces += 1;
                } else {
                    // A short read stops where the bad chunk begins; reading on from there fails.
                    let e = f.read_at(&mut buf[..4096], (off + n) as u64).expect_err("read at the bad chunk");
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {}: {e}", off + n);
                    eio += 1;
                }
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {off}: {e}");
                eio += 1;
            }
        }
    }
    assert!(eio >= 1, "no read failed on the corrupted image");
    assert!(eio <= 16, "{eio} pieces failed: only those touching one chunk should");
    assert!(good_pieces > 200, "{good_pieces} intact pieces");
    // The ELF header still reads, and so do the other files away from the bad chunk.
    assert_eq!(&std::fs::read(m.path("info.json")).unwrap()[..1], b"{");
    let log = m.stderr.recv_timeout(secs(5)).into_iter().chain(m.stderr_lines()).collect::<Vec<_>>().join("\n");
    assert!(log.contains("failed with EIO") && log.contains("chunk") && log.contains("/core.elf"), "{log}");

    // Read-only: writes, creates, truncation and chmod fail with EROFS.
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(std::fs::OpenOptions::new().write(true).open(m.path("pmem")).map(drop), "open for writing");
    erofs(std::fs::File::create(m.path("new-file")).map(drop), "create");
    erofs(std::fs::create_dir(m.path("d")), "mkdir");
    erofs(std::fs::remove_file(m.path("pmem")), "unlink");
    erofs(std::fs::set_permissions(m.path("pmem"), std::os::unix::fs::PermissionsExt::from_mode(0o666)), "chmod");
    drop(f);

    // SIGTERM unmounts and ends the process.
    // SAFETY: signalling the child we started, by its pid.
    assert_eq!(unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) }, 0);
    let (st, took, report) = m.wait_exit(secs(15));
    assert!(st.success(), "{st}");
    assert!(took < secs(10), "{took:?}");
    assert_eq!(report["ended"]["by"], "signal", "{report}");
    assert_eq!(report["ended"]["name"], "SIGTERM");
    assert!(report["reads"]["failed_reads"].as_u64().unwrap() >= 1);
    assert!(!m.path("info.json").exists(), "still mounted after SIGTERM");
}

#[test]
fn bad_mount_arguments_fail_clearly_without_mounting() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let truncated = work.path().join("truncated.img");
    std::fs::write(&truncated, b"FERRYIMG").unwrap();
    let missing = work.path().join("missing");
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["image", "mount", "/nonexistent/x.img", s(&dir)], "open image"),
        (vec!["image", "mount", s(&truncated), s(&dir)], "truncated"),
        (vec!["image", "mount", s(&truncated), s(&missing)], "truncated"),
    ];
    for (args, want) in cases {
        let o = ferry_cmd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
    }
    // The image is checked before the mount point; a bad mount point with a good image is
    // covered by the library (MountPoint error). Nothing was mounted.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn an_encrypted_chain_mounts_with_its_key_and_is_refused_without_it() {
    if !fuse_available() {
        return;
    }
    let (g, sock) = running_guest("dirty wss=4 rate=max report=200 fill=random", "64M");
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("key");
    std::fs::write(&key, b"mount me, and nobody else").unwrap();
    let k = ["--key-file", s(&key)];
    let full = work.path().join("full.img");
    let incr = work.path().join("incr.img");
    snapshot_ok(&sock, &full, &["--encrypt", "--key-file", s(&key)]);
    snapshot_ok(&sock, &incr, &["--parent", s(&full), "--encrypt", "--key-file", s(&key)]);
    drop(g);
    // With the key: the same bytes as the exports, through the decrypted, verified chunks.
    let mut m = Mounted::start_with(&incr, &work.path().join("mnt"), &k);
    check_mount_with(&m, &incr, work.path(), 2, &k);
    let st = Command::new("fusermount3").args(["-u", "--"]).arg(&m.dir).status().unwrap();
    assert!(st.success(), "fusermount3 -u: {st}");
    let (st, _, report) = m.wait_exit(secs(10));
    assert!(st.success(), "{st}: {:?}", m.stderr_lines());
    assert_eq!(report["reads"]["failed_reads"], 0, "{report}");
    drop(m);
    // Without the key, or with another: a clear error and no mount, before anything is shown.
    let wrong = work.path().join("wrong.key");
    std::fs::write(&wrong, b"not the key").unwrap();
    for (extra, want) in [(vec![], "key"), (vec!["--key-file", s(&wrong)], "key")] {
        let dir = work.path().join("refused");
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec!["image", "mount", s(&incr), s(&dir)];
        args.extend_from_slice(&extra);
        let o = ferry_cmd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "mounted with {extra:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.to_lowercase().contains(want), "{extra:?}: {err}");
        assert!(!dir.join("info.json").exists(), "nothing mounted with {extra:?}");
    }
}

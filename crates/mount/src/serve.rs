//! Mounting a [`MountView`] and serving it until it is unmounted
//! (`fusermount3 -u DIR`, `umount DIR`) or the process gets SIGINT, SIGTERM
//! or SIGHUP, which unmount it cleanly.
//!
//! The termination signals are blocked in the calling thread before the FUSE
//! thread starts (it inherits the mask) and taken with `sigtimedwait`, which
//! also lets the loop notice an external unmount within [`POLL`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fs::ImageFs;
use crate::view::{MountView, ReadStats};

/// How often the serving loop checks for an external unmount.
const POLL: Duration = Duration::from_millis(100);
/// How long an unmount may take to end the FUSE session.
const UNMOUNT_WAIT: Duration = Duration::from_secs(10);

/// Mount options.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Let users other than the one mounting read the files (`allow_other`).
    pub allow_other: bool,
}

/// Why the mount ended.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Ended {
    /// Unmounted from outside (`fusermount3 -u`, `umount`).
    Unmounted,
    /// A termination signal; ferry unmounted.
    Signal {
        /// SIGINT, SIGTERM or SIGHUP.
        name: &'static str,
    },
}

/// What a mount did, printed when it ends.
#[derive(Clone, Debug, Serialize)]
pub struct MountReport {
    /// The image.
    pub image: PathBuf,
    /// The mount point.
    pub mountpoint: PathBuf,
    /// How it ended.
    pub ended: Ended,
    /// Time mounted.
    pub mounted_secs: f64,
    /// Read figures.
    pub reads: ReadStats,
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    }
}

/// Waits up to `timeout` for one of `set`; the signal number, or None on timeout.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: set and ts are initialised; a null siginfo pointer is allowed.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// The mount point as a C string (canonical, as the kernel knows it).
fn c_path(p: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::MountPoint { path: p.to_path_buf(), reason: "contains a NUL byte".into() })
}

/// Unmounts `dir`: plainly, lazily when busy (open files keep the connection until
/// closed), or through `fusermount3 -u -z` when not privileged.
fn unmount(dir: &Path) -> Result<()> {
    let c = c_path(dir)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // SAFETY: as above.
        Some(libc::EBUSY) if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 => Ok(()),
        Some(libc::EPERM) => {
            let st =
                std::process::Command::new("fusermount3").args(["-u", "-z", "--"]).arg(dir).status().map_err(|e| {
                    Error::Unmount { path: dir.to_path_buf(), reason: format!("running fusermount3: {e}") }
                })?;
            if st.success() {
                Ok(())
            } else {
                Err(Error::Unmount { path: dir.to_path_buf(), reason: format!("fusermount3 -u: {st}") })
            }
        }
        // Already gone (unmounted from outside at the same moment).
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        _ => Err(Error::Unmount { path: dir.to_path_buf(), reason: e.to_string() }),
    }
}

/// Mount-option text must not carry commas (they separate options).
fn option_safe(s: &str) -> String {
    s.chars().map(|c| if c == ',' || c.is_whitespace() { '_' } else { c }).collect()
}

/// Mounts `view` read-only at `dir`, calls `on_mounted` once the files are visible, and
/// serves reads until the mount is unmounted or a termination signal arrives (then it
/// unmounts). Blocks SIGINT, SIGTERM and SIGHUP in the calling thread while it runs.
pub fn serve(view: MountView, dir: &Path, opts: &ServeOptions, on_mounted: impl FnOnce()) -> Result<MountReport> {
    let meta =
        std::fs::metadata(dir).map_err(|e| Error::MountPoint { path: dir.to_path_buf(), reason: e.to_string() })?;
    if !meta.is_dir() {
        return Err(Error::MountPoint { path: dir.to_path_buf(), reason: "not a directory".into() });
    }
    let dir = dir.canonicalize().map_err(|e| Error::MountPoint { path: dir.to_path_buf(), reason: e.to_string() })?;
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(Error::NoFuse)?;

    let set = termination_set();
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is initialised, old is writable.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if rc != 0 {
        return Err(Error::Sys { what: "pthread_sigmask", source: std::io::Error::from_raw_os_error(rc) });
    }
    let result = serve_blocked(view, &dir, opts, on_mounted, &set);
    // SAFETY: old was filled by the call above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

fn serve_blocked(
    view: MountView,
    dir: &Path,
    opts: &ServeOptions,
    on_mounted: impl FnOnce(),
    set: &libc::sigset_t,
) -> Result<MountReport> {
    let image = view.image().to_path_buf();
    let view = Arc::new(view);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
        MountOption::FSName(option_safe(&format!("ferry:{}", image.display()))),
        MountOption::Subtype("ferry".into()),
    ];
    config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
    let session = Session::new(ImageFs::new(Arc::clone(&view)), dir, &config)
        .map_err(|source| Error::Mount { path: dir.to_path_buf(), source })?;
    let bg = session.spawn().map_err(|e| Error::Sys { what: "spawning the FUSE thread", source: e })?;
    let t0 = Instant::now();
    on_mounted();

    let ended = loop {
        if bg.guard.is_finished() {
            break Ended::Unmounted;
        }
        if let Some(sig) = wait_signal(set, POLL) {
            unmount(dir)?;
            break Ended::Signal { name: signal_name(sig) };
        }
    };
    let deadline = Instant::now() + UNMOUNT_WAIT;
    while !bg.guard.is_finished() {
        if Instant::now() >= deadline {
            // Lazily detached with files still open: the connection ends when they close or
            // when this process exits. Do not touch the path again.
            std::mem::forget(bg);
            return Err(Error::Unmount {
                path: dir.to_path_buf(),
                reason: format!(
                    "detached, but files stay open after {UNMOUNT_WAIT:?}; the mount ends when ferry exits"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bg.join().map_err(|e| Error::Unmount { path: dir.to_path_buf(), reason: format!("FUSE session: {e}") })?;
    Ok(MountReport {
        image,
        mountpoint: dir.to_path_buf(),
        ended,
        mounted_secs: t0.elapsed().as_secs_f64(),
        reads: view.stats(),
    })
}

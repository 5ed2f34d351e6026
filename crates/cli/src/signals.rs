//! SIGTERM, SIGINT and SIGHUP stop a served VM cleanly: the guest gets
//! Ctrl-Alt-Del and the shutdown timeout, an operation in progress (a
//! snapshot) may finish first, and then ferry exits the normal way (report
//! written, API socket removed). A second signal stops the guest at once.
//!
//! The signals are blocked in every thread (the mask is set before the
//! first thread starts, and threads inherit it) and taken by one thread
//! with `sigwait`, so no async-signal-safety rules constrain the handling.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_migrate::VmController;
use ferry_vmm::ExitReason;

/// The termination signals, blocked in the calling thread.
pub struct Blocked {
    set: libc::sigset_t,
}

/// How long a signal waits for a running operation before shutting down anyway.
const OPERATION_WAIT: Duration = Duration::from_secs(30);

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

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread; call before spawning
/// any thread so that all of them inherit the mask.
pub fn block_termination() -> std::io::Result<Blocked> {
    let set = termination_set();
    // SAFETY: set is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(Blocked { set })
}

/// Which signal started the stop, once one arrived.
#[derive(Clone, Default)]
pub struct Received(Arc<OnceLock<&'static str>>);

impl Received {
    /// The signal's name, if one arrived.
    pub fn received(&self) -> Option<&'static str> {
        self.0.get().copied()
    }
}

fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// What a signal stops.
pub enum Watched {
    /// A running VM.
    Vm(Arc<VmController>),
    /// A `ferry receive` whose VM may not have arrived yet (and its API socket).
    Incoming(Arc<crate::api::Target>, Option<std::path::PathBuf>),
}

/// Starts the thread that turns termination signals into a clean shutdown.
pub fn spawn_shutdown_thread(blocked: Blocked, watched: Watched, timeout: Duration) -> std::io::Result<Received> {
    let received = Received::default();
    let r = received.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: the set is initialised and sig is a valid out pointer.
        if unsafe { libc::sigwait(&blocked.set, &mut sig) } != 0 {
            continue;
        }
        let ctl = match &watched {
            Watched::Vm(c) => c.clone(),
            Watched::Incoming(t, sock) => match t.controller() {
                Some(c) => c.clone(),
                None => {
                    // No guest yet: nothing to shut down, and nothing ran.
                    eprintln!("ferry: {} while waiting for a migration: exiting", name(sig));
                    if let Some(p) = sock {
                        let _ = std::fs::remove_file(p);
                    }
                    std::process::exit(1);
                }
            },
        };
        if r.0.set(name(sig)).is_ok() {
            eprintln!(
                "ferry: {}: shutting the guest down (Ctrl-Alt-Del, stopped after {} ms); send it again to stop at once",
                name(sig),
                timeout.as_millis()
            );
            let ctl = ctl.clone();
            let _ = std::thread::Builder::new().name("signal-stop".into()).spawn(move || {
                if !ctl.shutdown_when_free(timeout, OPERATION_WAIT) {
                    // A guest whose migration commit is in doubt is kept on purpose.
                    eprintln!(
                        "ferry: the guest was not shut down (stopped, already shutting down, migrated, or its migration's commit is in doubt: see GET /vm/migration); send the signal again to stop it at once"
                    );
                }
            });
        } else {
            eprintln!("ferry: {} again: stopping the guest now", name(sig));
            ctl.vm().stop(ExitReason::ShutdownForced);
        }
    })?;
    Ok(received)
}

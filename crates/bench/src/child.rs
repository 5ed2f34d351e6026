//! Child processes: the `ferry` binary under test and the peers, each killed
//! and reaped on every path, with their output collected line by line.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What `ferry run --kernel` calls the embedded test guest (the CLI's
/// `BUILTIN_TEST_GUEST`; spelled again here because the bench talks to the
/// binary only through its command line).
pub(crate) const TEST_GUEST: &str = "builtin:test";

/// The `ferry` binary to drive: the one running this bench, so a bench always
/// measures the build it was started from.
pub(crate) fn ferry_exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the ferry binary")
}

/// Whether `ferry <cmd>` has `flag` (options other work adds may be absent).
pub(crate) fn has_flag(cmd: &str, flag: &str) -> bool {
    ferry_exe()
        .ok()
        .and_then(|exe| Command::new(exe).args([cmd, "--help"]).output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// Runs `ferry <args>` (a client command that prints JSON: `digest`,
/// `shutdown`, `console`, ...) and returns its JSON. The bench goes through
/// the CLI rather than a second HTTP client, so it exercises the same path a
/// user does.
pub(crate) fn ferry_json(args: &[&str]) -> Result<serde_json::Value> {
    let o = Command::new(ferry_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ferry {}", args.join(" ")))?;
    if !o.status.success() {
        bail!("ferry {} failed ({}): {}", args.join(" "), o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    let text = String::from_utf8_lossy(&o.stdout);
    if text.trim().is_empty() || text.trim() == "null" {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("parsing the output of ferry {}: {text}", args.join(" ")))
}

/// Runs `ferry <args>` (e.g. `certs init`) and fails with its stderr if it fails.
pub(crate) fn ferry_ok(args: &[&str]) -> Result<()> {
    let o = Command::new(ferry_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ferry {}", args.join(" ")))?;
    if !o.status.success() {
        bail!("ferry {} failed ({}): {}", args.join(" "), o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// Lines of a child's output with their arrival times.
pub(crate) type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// Reads `r` line by line into `sink`, stamping each line with its arrival
/// time (the benches time guest output), until EOF.
pub(crate) fn read_lines(r: impl Read + Send + 'static, sink: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                    sink.lock().unwrap().push((Instant::now(), line));
                }
            }
        }
    })
}

/// A child process whose output is collected line by line, and which is
/// killed and reaped when dropped (on every path, errors included).
pub(crate) struct Kid {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) spawned: Instant,
    pub(crate) out: Lines,
    pub(crate) err: Lines,
    readers: Vec<JoinHandle<()>>,
}

impl Kid {
    /// Starts `cmd` with stdout and stderr collected; `name` is for messages.
    pub(crate) fn spawn(name: &str, cmd: &mut Command) -> Result<Kid> {
        Kid::spawn_with_stdin(name, cmd, Stdio::null())
    }

    /// [`Kid::spawn`] with `stdin` for the child (a terminal, for a peer that
    /// takes its serial port's input only from one).
    pub(crate) fn spawn_with_stdin(name: &str, cmd: &mut Command, stdin: Stdio) -> Result<Kid> {
        let spawned = Instant::now();
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let (out, err) = (Lines::default(), Lines::default());
        let readers = vec![
            read_lines(child.stdout.take().context("child stdout")?, out.clone()),
            read_lines(child.stderr.take().context("child stderr")?, err.clone()),
        ];
        Ok(Kid { name: name.to_string(), child, spawned, out, err, readers })
    }

    /// The exit status if the process has ended, without waiting.
    pub(crate) fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for exit until `deadline`; `None` if still running.
    pub(crate) fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for exit (killing the process and failing after `timeout`), then
    /// gives the output readers a bounded moment to drain.
    pub(crate) fn finish(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.wait_until(Instant::now() + timeout)? {
            Some(s) => {
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.readers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(s)
            }
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not finish within {} s (killed){}", self.name, timeout.as_secs(), self.tail())
            }
        }
    }

    /// All of `lines` as one string (for parsing a client's JSON output).
    pub(crate) fn text(lines: &Lines) -> String {
        lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// The last lines of stderr, for error messages.
    pub(crate) fn tail(&self) -> String {
        let l = self.err.lock().unwrap();
        let tail: Vec<&str> = l.iter().rev().take(8).rev().map(|(_, s)| s.as_str()).collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends:\n    {}", tail.join("\n    "))
        }
    }

    /// Lines of stdout so far: a starting index for [`Kid::wait_line`].
    pub(crate) fn out_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// The first stderr line matching `pred`, if one has arrived.
    pub(crate) fn find_err(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.find_line(&self.err, 0, &pred).map(|(_, _, l)| l)
    }

    fn find_line(&self, lines: &Lines, from: usize, pred: &dyn Fn(&str) -> bool) -> Option<(usize, Instant, String)> {
        let l = lines.lock().unwrap();
        l.iter().enumerate().skip(from).find(|(_, (_, s))| pred(s)).map(|(i, (t, s))| (i, *t, s.clone()))
    }

    /// Waits for a line (stdout, or stderr with `on_err`) matching `pred` at
    /// index `from` or later; fails if the process exits or time runs out.
    pub(crate) fn wait_line(
        &mut self,
        what: &str,
        on_err: bool,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Instant, String)> {
        let deadline = Instant::now() + timeout;
        let lines = if on_err { self.err.clone() } else { self.out.clone() };
        loop {
            if let Some(hit) = self.find_line(&lines, from, &pred) {
                return Ok(hit);
            }
            if let Some(st) = self.exited()? {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(hit) = self.find_line(&lines, from, &pred) {
                    return Ok(hit);
                }
                bail!("{} exited ({st}) before printing {what}{}", self.name, self.tail());
            }
            if Instant::now() >= deadline {
                bail!("{} did not print {what} within {} s{}", self.name, timeout.as_secs(), self.tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `cmd`, returns (wall, user+system CPU of the child, stdout).
pub(crate) fn timed(cmd: &mut Command) -> Result<(Duration, Duration, Vec<u8>)> {
    use std::io::Read;
    let t0 = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut so = child.stdout.take().context("child stdout")?;
    let mut se = child.stderr.take().context("child stderr")?;
    let t = std::thread::spawn(move || {
        let _ = se.read_to_end(&mut err);
        err
    });
    so.read_to_end(&mut out)?;
    let err = t.join().unwrap_or_default();
    let mut status = 0i32;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for the child we spawned.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child by its pid, with valid pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = t0.elapsed();
    if pid < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed ({status:#x}): {}", String::from_utf8_lossy(&err).trim());
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Ok((wall, tv(ru.ru_utime) + tv(ru.ru_stime), out))
}

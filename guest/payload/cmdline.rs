//! The guest's command line, the host commands it accepts on COM1 and the
//! Ctrl-Alt-Del detector for the i8042.
//!
//! Shared (via `#[path]`) between the no_std guest and the host crate, so the
//! contract with ferry's tests is unit-tested on the host. Uses `core` only.

/// What the guest does after booting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Print a PROGRESS line every `report` ms and wait for commands.
    Idle,
    /// Mark all workload pages, then keep rewriting the working set.
    Dirty,
}

/// Deliberate failures, to test how the VMM reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// An exception with an empty IDT: triple fault (KVM_EXIT_SHUTDOWN).
    Triple,
    /// Jump to 0xd0000000 where no RAM is: KVM cannot emulate the fetch.
    MmioExec,
}

/// Page rewrite rate of the whole guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// As fast as the CPUs can store.
    Max,
    /// Pages per second (all CPUs together).
    PagesPerSec(u64),
}

/// What the dirty workload stores into a page (`fill=word|random`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// One 8-byte marker word at offset 0 (`pattern::page_word`); the rest
    /// of the page is never written. Compresses extremely well.
    Word,
    /// The whole page: the marker word, then 511 pseudo-random words from
    /// (pfn, generation) (`pattern::random_word`). Incompressible.
    Random,
}

/// Longest `plant=` pattern in bytes.
pub const MAX_PLANT: usize = 32;

/// `plant=<hex>@<gpa>`: bytes the guest writes at a guest-physical address
/// after booting, so analysis tests can look for a known pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plant {
    /// Guest-physical (= virtual, identity mapped) address of the first byte.
    pub gpa: u64,
    /// Number of bytes used in `bytes`.
    pub len: usize,
    /// The bytes.
    pub bytes: [u8; MAX_PLANT],
}

impl Plant {
    /// The planted bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Parses `<hex bytes>@<hex address>` (address with or without `0x`).
    pub fn parse(v: &str) -> Option<Plant> {
        let (hex, at) = v.split_once('@')?;
        let at = at.strip_prefix("0x").unwrap_or(at);
        if at.is_empty() || at.len() > 16 || hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * MAX_PLANT {
            return None;
        }
        let gpa = u64::from_str_radix(at, 16).ok()?;
        let mut bytes = [0u8; MAX_PLANT];
        let h = hex.as_bytes();
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        for (i, b) in bytes.iter_mut().take(h.len() / 2).enumerate() {
            *b = digit(h[2 * i])? << 4 | digit(h[2 * i + 1])?;
        }
        Some(Plant { gpa, len: h.len() / 2, bytes })
    }
}

/// Most `plant=` words on one command line (each is written, in order).
pub const MAX_PLANTS: usize = 8;

/// The `plant=` words of a command line, in order (a fixed array: no allocator in the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plants {
    list: [Option<Plant>; MAX_PLANTS],
}

impl Plants {
    /// No plants.
    pub const fn new() -> Self {
        Plants { list: [None; MAX_PLANTS] }
    }

    /// Adds one; `false` when there are already [`MAX_PLANTS`].
    fn push(&mut self, p: Plant) -> bool {
        match self.list.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(p);
                true
            }
            None => false,
        }
    }

    /// The plants in command-line order.
    pub fn iter(&self) -> impl Iterator<Item = &Plant> + '_ {
        self.list.iter().map_while(|p| p.as_ref())
    }

    /// The last plant given (the only one on most command lines).
    pub fn last(&self) -> Option<Plant> {
        self.iter().last().copied()
    }
}

impl Default for Plants {
    fn default() -> Self {
        Self::new()
    }
}

/// Largest `scratch=` region in MiB.
pub const MAX_SCRATCH_MIB: u64 = 1024;

/// Parsed boot command line; `None` means "use the default".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Selected mode (`idle` or `dirty`; default idle).
    pub mode: Mode,
    /// `mem=<MiB>`: RAM covered by the workload.
    pub mem_mib: Option<u64>,
    /// `wss=<MiB>`: rewritten working set.
    pub wss_mib: Option<u64>,
    /// `rate=<pages/s>|max`.
    pub rate: Rate,
    /// `fill=word|random`: what a page store writes (default word).
    pub fill: Fill,
    /// `passes=<n>`: verify and exit after n passes.
    pub passes: Option<u64>,
    /// `verify`: verify once right after marking.
    pub verify: bool,
    /// `report=<ms>`: minimum interval between PROGRESS lines.
    pub report_ms: Option<u64>,
    /// `cpus=<n>`: CPUs to start instead of the MP table's count.
    pub cpus: Option<u32>,
    /// `tsc_khz=<n>`: TSC frequency instead of CPUID/PIT.
    pub tsc_khz: Option<u64>,
    /// `crash=triple|mmio-exec`.
    pub crash: Option<Crash>,
    /// `exit=<n>`: print a line and exit at once with status n.
    pub exit: Option<u8>,
    /// `plant=<hex>@<gpa>` (repeatable, up to [`MAX_PLANTS`]): bytes written at addresses after boot.
    pub plants: Plants,
    /// `scratch=<MiB>`: RAM at the start of the workload area filled with data
    /// that `verify` never checks (plants there survive the dirty workload).
    pub scratch_mib: Option<u64>,
    /// `plant_after=<ms>`: write the `plant=` bytes this long after boot
    /// instead of at once (so a watch can see them appear).
    pub plant_after_ms: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Idle,
            mem_mib: None,
            wss_mib: None,
            rate: Rate::Max,
            fill: Fill::Word,
            passes: None,
            verify: false,
            report_ms: None,
            cpus: None,
            tsc_khz: None,
            crash: None,
            exit: None,
            plants: Plants::new(),
            scratch_mib: None,
            plant_after_ms: None,
        }
    }
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses the boot command line. An unknown or malformed word is returned as
/// the error (the guest prints `ERROR unknown arg <word>` and exits with 2).
pub fn parse(line: &str) -> Result<Config, &str> {
    let mut c = Config::default();
    for word in line.split_ascii_whitespace() {
        let (key, val) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let ok = match (key, val) {
            ("idle", None) => {
                c.mode = Mode::Idle;
                true
            }
            ("dirty", None) => {
                c.mode = Mode::Dirty;
                true
            }
            ("verify", None) => {
                c.verify = true;
                true
            }
            ("mem", Some(v)) => num(v).map(|n| c.mem_mib = Some(n)).is_some(),
            ("wss", Some(v)) => num(v).map(|n| c.wss_mib = Some(n)).is_some(),
            ("rate", Some("max")) => {
                c.rate = Rate::Max;
                true
            }
            ("rate", Some(v)) => num(v).filter(|&n| n > 0).map(|n| c.rate = Rate::PagesPerSec(n)).is_some(),
            ("fill", Some("word")) => {
                c.fill = Fill::Word;
                true
            }
            ("fill", Some("random")) => {
                c.fill = Fill::Random;
                true
            }
            ("passes", Some(v)) => num(v).map(|n| c.passes = Some(n)).is_some(),
            ("report", Some(v)) => num(v).map(|n| c.report_ms = Some(n)).is_some(),
            ("cpus", Some(v)) => {
                num(v).filter(|&n| n >= 1 && n <= u32::MAX as u64).map(|n| c.cpus = Some(n as u32)).is_some()
            }
            ("tsc_khz", Some(v)) => num(v).filter(|&n| n > 0).map(|n| c.tsc_khz = Some(n)).is_some(),
            ("crash", Some("triple")) => {
                c.crash = Some(Crash::Triple);
                true
            }
            ("crash", Some("mmio-exec")) => {
                c.crash = Some(Crash::MmioExec);
                true
            }
            ("plant", Some(v)) => Plant::parse(v).is_some_and(|p| c.plants.push(p)),
            ("scratch", Some(v)) => {
                num(v).filter(|&n| (1..=MAX_SCRATCH_MIB).contains(&n)).map(|n| c.scratch_mib = Some(n)).is_some()
            }
            ("plant_after", Some(v)) => num(v).map(|n| c.plant_after_ms = Some(n)).is_some(),
            ("exit", Some(v)) => num(v).filter(|&n| n <= 255).map(|n| c.exit = Some(n as u8)).is_some(),
            _ => false,
        };
        if !ok {
            return Err(word);
        }
    }
    Ok(c)
}

/// A command the host typed on COM1 (one per line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `verify`: quiesce all CPUs, check every page, print the result.
    Verify,
    /// `exit <n>`: exit with status n.
    Exit(u8),
    /// `status`: print a PROGRESS line now.
    Status,
}

/// Parses one host command line (surrounding whitespace ignored); `None`
/// for an empty line, `Some(Err(line))` for an unknown command.
pub fn parse_command(line: &str) -> Option<Result<Command, &str>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let mut words = line.split_ascii_whitespace();
    let cmd = match (words.next(), words.next(), words.next()) {
        (Some("verify"), None, _) => Some(Command::Verify),
        (Some("status"), None, _) => Some(Command::Status),
        (Some("exit"), Some(n), None) => num(n).filter(|&n| n <= 255).map(|n| Command::Exit(n as u8)),
        _ => None,
    };
    Some(cmd.ok_or(line))
}

/// Collects COM1 bytes into lines (CR or LF ends a line; overlong lines are
/// dropped whole).
pub struct LineBuf {
    buf: [u8; 64],
    len: usize,
    overflow: bool,
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuf {
    /// An empty buffer.
    pub const fn new() -> Self {
        LineBuf { buf: [0; 64], len: 0, overflow: false }
    }

    /// Adds a byte; returns the finished line when `b` ends one.
    pub fn push(&mut self, b: u8) -> Option<&str> {
        if b == b'\n' || b == b'\r' {
            let (len, overflow) = (self.len, self.overflow);
            self.len = 0;
            self.overflow = false;
            if overflow || len == 0 {
                return None;
            }
            return core::str::from_utf8(&self.buf[..len]).ok();
        }
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        } else {
            self.overflow = true;
        }
        None
    }
}

/// Recognises Ctrl+Alt+Del in the i8042 byte stream, in scancode set 1
/// (`1d 38 53`, what ferry sends; also QEMU with translation) and set 2
/// (`14 11 e0 71`, e.g. Firecracker, QEMU without translation).
#[derive(Default)]
pub struct CtrlAltDel {
    ctrl: bool,
    alt: bool,
    release_next: bool,
}

impl CtrlAltDel {
    /// A detector with no keys held.
    pub const fn new() -> Self {
        CtrlAltDel { ctrl: false, alt: false, release_next: false }
    }

    /// Feeds one byte read from port 0x60; true when Del is pressed while
    /// Ctrl and Alt are held.
    pub fn feed(&mut self, b: u8) -> bool {
        match b {
            0xe0 | 0xe1 => return false,
            0xf0 => {
                self.release_next = true;
                return false;
            }
            _ => {}
        }
        let (code, release) = if self.release_next {
            (b, true)
        } else if b & 0x80 != 0 {
            (b & 0x7f, true)
        } else {
            (b, false)
        };
        self.release_next = false;
        match code {
            0x1d | 0x14 => self.ctrl = !release,
            0x38 | 0x11 => self.alt = !release,
            0x53 | 0x71 if !release && self.ctrl && self.alt => {
                *self = CtrlAltDel::new();
                return true;
            }
            _ => {}
        }
        false
    }
}

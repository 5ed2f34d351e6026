//! `ferry image read|maps|scan|diff|stats|redact`: memory analysis of an image. Parses,
//! calls `ferry-inspect`, prints for a person or as JSON.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ferry_image::UserKey;
use ferry_inspect::{ImageMem, Literals, PagingContext, Pattern, ScanOptions, YaraRules};

/// Parses `0x...` as hex, anything else as decimal.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let s = s.replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e} (use decimal or 0x-prefixed hex)"))
}

/// The image, its key and the output format.
#[derive(Args)]
pub struct Common {
    /// The image (its parents are found through the chain).
    pub image: PathBuf,
    /// Key file for encrypted images.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Which page tables to walk.
#[derive(Args)]
pub struct TableArgs {
    /// Walk the page tables of this vCPU (its saved CR3 and paging mode); default 0.
    #[arg(long, conflicts_with = "cr3")]
    pub vcpu: Option<usize>,
    /// Walk the page tables at this physical address (paging mode of vCPU 0).
    #[arg(long, value_parser = parse_u64)]
    pub cr3: Option<u64>,
}

/// `ferry image read`.
#[derive(Args)]
pub struct ReadArgs {
    #[command(flatten)]
    common: Common,
    /// Guest-physical address to read.
    #[arg(long, value_parser = parse_u64, required_unless_present = "virt", conflicts_with = "virt")]
    phys: Option<u64>,
    /// Virtual address to read through the page tables.
    #[arg(long, value_parser = parse_u64)]
    virt: Option<u64>,
    /// Bytes to read.
    #[arg(long, value_parser = parse_u64, default_value = "64")]
    len: u64,
    #[command(flatten)]
    tables: TableArgs,
}

/// `ferry image maps`.
#[derive(Args)]
pub struct MapsArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    tables: TableArgs,
}

/// `ferry image scan`.
#[derive(Args)]
pub struct ScanArgs {
    #[command(flatten)]
    common: Common,
    /// Text to search for (UTF-8 bytes); repeatable.
    #[arg(long)]
    string: Vec<String>,
    /// Bytes to search for, in hex (`deadbeef`, `0xde ad`); repeatable.
    #[arg(long)]
    hex: Vec<String>,
    /// A YARA rule file (YARA-X): text, hex and bounded regexp patterns; conditions are
    /// evaluated over all of memory. Modules, `filesize`, offsets and unbounded patterns are refused.
    #[arg(long, conflicts_with_all = ["string", "hex"])]
    rules: Option<PathBuf>,
    /// With --rules: hand every block to YARA-X, also those without any pattern's literal
    /// (the prefilter never changes the result; this compares speed and checks that).
    #[arg(long, requires = "rules")]
    no_prefilter: bool,
    /// Matches to list (all are counted).
    #[arg(long, default_value_t = 1000)]
    max_matches: usize,
    /// Do not look up virtual addresses of the matches.
    #[arg(long)]
    no_virt: bool,
    /// Threads searching at once (default: the CPUs, at most 8).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    tables: TableArgs,
}

fn open(c: &Common) -> Result<ImageMem> {
    let key = c.key_file.as_deref().map(UserKey::from_file).transpose()?;
    Ok(ImageMem::open(&c.image, key.as_ref())?)
}

/// The page tables the user chose: `--cr3`, else `--vcpu` (default 0).
fn context(mem: &mut ImageMem, t: &TableArgs) -> Result<PagingContext> {
    let cpus = mem.chain().cpus()?;
    if let Some(cr3) = t.cr3 {
        let five = cpus.first().is_some_and(|c| c.cr4 & (1 << 12) != 0);
        return Ok(PagingContext::from_cr3(cr3, five));
    }
    let index = t.vcpu.unwrap_or(0);
    let regs = cpus.get(index).ok_or(ferry_inspect::Error::NoSuchVcpu { index, count: cpus.len() })?;
    Ok(PagingContext::from_regs(index, regs)?)
}

pub(crate) fn hexdump(start: u64, bytes: &[u8]) {
    for (i, line) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String =
            line.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
        println!("{:#018x}  {:<47}  |{text}|", start.wrapping_add(i as u64 * 16), hex.join(" "));
    }
}

pub(crate) fn size_name(s: u64) -> &'static str {
    match s {
        4096 => "4K",
        0x20_0000 => "2M",
        _ => "1G",
    }
}

/// `ferry image read`.
pub fn read(a: ReadArgs) -> Result<u8> {
    let mut mem = open(&a.common)?;
    if let Some(pa) = a.phys {
        let r = ferry_inspect::read_phys(&mut mem, pa, a.len)?;
        if a.common.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            hexdump(pa, &r.bytes);
        }
        return Ok(0);
    }
    let Some(va) = a.virt else { bail!("give --phys or --virt") };
    let ctx = context(&mut mem, &a.tables)?;
    let first = ferry_inspect::translate(&mut mem, &ctx, va)?;
    let r = ferry_inspect::read_virt(&mut mem, &ctx, va, a.len)?;
    if a.common.json {
        let v = serde_json::json!({"translation": first, "read": r});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{}-level paging, root {:#x}", ctx.levels, ctx.root);
    for s in &first.steps {
        println!("  {:<4} [{:3}] at {:#014x} = {:#018x}", s.level.to_string(), s.index, s.entry_addr, s.entry);
    }
    for p in &r.pieces {
        println!("{:#018x} -> {:#014x}  {:>5} bytes  {} page  {}", p.va, p.pa, p.len, size_name(p.page_size), p.flags);
    }
    hexdump(va, &r.bytes);
    Ok(0)
}

/// `ferry image maps`.
pub fn maps(a: MapsArgs) -> Result<u8> {
    let mut mem = open(&a.common)?;
    let ctx = context(&mut mem, &a.tables)?;
    let r = ferry_inspect::maps(&mut mem, &ctx)?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("{}-level paging, root {:#x}", ctx.levels, ctx.root);
    for m in &r.runs {
        println!(
            "{:#018x}-{:#018x} -> {:#014x}  {:>10} KiB  {} pages  {}",
            m.va_start,
            m.va_end,
            m.pa_start,
            m.len() >> 10,
            size_name(m.page_size),
            m.flags
        );
    }
    println!(
        "{} runs, {} MiB mapped ({} 4K, {} 2M, {} 1G pages) from {} tables",
        r.runs.len(),
        r.mapped_bytes >> 20,
        r.pages_4k,
        r.pages_2m,
        r.pages_1g,
        r.tables
    );
    for s in &r.stops {
        println!("skipped at {:#x}: {s}", s.va);
    }
    if r.skipped as usize > r.stops.len() {
        println!("... {} entries skipped in all", r.skipped);
    }
    if r.truncated {
        println!("TRUNCATED: the page tables exceed the walker's bounds");
    }
    Ok(0)
}

/// `ferry image scan`.
pub fn scan(a: ScanArgs) -> Result<u8> {
    enum What {
        Literals(Literals),
        Yara(Box<YaraRules>),
    }
    let what = if let Some(path) = &a.rules {
        let rules = YaraRules::from_file(path)?;
        What::Yara(Box::new(if a.no_prefilter { rules.without_prefilter() } else { rules }))
    } else {
        let mut pats = Vec::new();
        for s in &a.string {
            pats.push(Pattern::string(s)?);
        }
        for h in &a.hex {
            pats.push(Pattern::hex(h)?);
        }
        if pats.is_empty() {
            bail!("give at least one --string or --hex pattern, or --rules FILE");
        }
        What::Literals(Literals::new(pats)?)
    };
    let mut mem = open(&a.common)?;
    let explicit = a.tables.vcpu.is_some() || a.tables.cr3.is_some();
    let paging = if a.no_virt {
        None
    } else {
        match context(&mut mem, &a.tables) {
            Ok(c) => Some(c),
            Err(e) if !explicit => {
                if !a.common.json {
                    eprintln!("ferry: no virtual addresses: {e}");
                }
                None
            }
            Err(e) => return Err(e),
        }
    };
    let mut opts = ScanOptions { max_matches: a.max_matches, paging, ..ScanOptions::default() };
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    let r = match &what {
        What::Literals(m) => ferry_inspect::scan(&mut mem, m, &opts)?,
        What::Yara(rules) => {
            let mut show = progress_line("yara scan");
            let r = ferry_inspect::scan_yara(&mut mem, rules, &opts, &mut |d, t| show(d, t, false))?;
            show(0, 0, true);
            r
        }
    };
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    for m in &r.matches {
        let va: Vec<String> = m.va.iter().map(|v| format!("{v:#x}")).collect();
        let name = match &m.rule {
            Some(rule) => format!("{rule}:{}", m.pattern),
            None => m.pattern.clone(),
        };
        println!("{:#014x}  {name}  va {}", m.pa, if va.is_empty() { "-".into() } else { va.join(",") });
    }
    if let Some(y) = &r.yara {
        println!(
            "{} of {} rule(s) matched{}{}",
            y.matching_rules.len(),
            y.rules,
            if y.matching_rules.is_empty() { String::new() } else { format!(": {}", y.matching_rules.join(", ")) },
            if y.feed.unsafe_edges > 0 {
                format!(
                    " ({} block edge(s) inside long words: fullword/\\b matches there are unsure)",
                    y.feed.unsafe_edges
                )
            } else {
                String::new()
            }
        );
    }
    println!(
        "{} match(es){}; scanned {:.1} MiB of {} MiB of RAM in {:.3} s ({:.2} GB/s)",
        r.total_matches,
        if r.truncated { format!(", first {} listed", r.matches.len()) } else { String::new() },
        r.bytes_scanned as f64 / (1 << 20) as f64,
        r.ram_bytes >> 20,
        r.elapsed_secs,
        r.bytes_scanned as f64 / r.elapsed_secs.max(1e-9) / 1e9
    );
    Ok(0)
}

/// A progress printer for a terminal: `show(done, total, finished)` rewrites one stderr line
/// at most every 200 ms, and nothing at all when stderr is not a terminal.
fn progress_line(what: &'static str) -> impl FnMut(u64, u64, bool) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let t0 = std::time::Instant::now();
    let mut last = t0;
    let mut shown = false;
    move |done, total, finished| {
        if !tty {
            return;
        }
        if finished {
            if shown {
                eprint!("\r\x1b[K");
            }
            return;
        }
        if last.elapsed() < std::time::Duration::from_millis(200) {
            return;
        }
        last = std::time::Instant::now();
        shown = true;
        eprint!(
            "\r\x1b[K{what}: {:.0} of {:.0} MiB ({:.0}%), {:.1} s",
            done as f64 / 1048576.0,
            total as f64 / 1048576.0,
            100.0 * done as f64 / total.max(1) as f64,
            t0.elapsed().as_secs_f64()
        );
    }
}

/// `ferry image diff`.
#[derive(Args)]
pub struct DiffArgs {
    /// The older image.
    pub a: PathBuf,
    /// The newer image (if its chain contains A, only the pages recorded after A are read).
    pub b: PathBuf,
    /// Key file for encrypted images (both chains).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Compare all memory even when B descends from A.
    #[arg(long)]
    pub full: bool,
    /// Changed runs at most this many pages apart are listed as one range.
    #[arg(long, default_value_t = 16)]
    pub gap: u64,
    /// Do not attribute changes to virtual ranges (B's vCPU 0 page tables).
    #[arg(long)]
    pub no_virt: bool,
    /// Threads comparing at once (default: the CPUs, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `ferry image stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// One or more images (sharing is counted across all of them).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Key file for encrypted images.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Compress every n-th non-zero page to estimate lz4 and zstd ratios (1 = all).
    #[arg(long, default_value_t = 16)]
    pub compress_every: u64,
    /// Threads per image (default: the CPUs, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Prints the changed pages between two images.
pub fn diff(a: DiffArgs) -> Result<u8> {
    let key = a.key_file.as_deref().map(UserKey::from_file).transpose()?;
    let mut opts =
        ferry_inspect::DiffOptions { force_full: a.full, gap_pages: a.gap, virt: !a.no_virt, ..Default::default() };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let r = ferry_inspect::diff(&a.a, &a.b, key.as_ref(), &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("{} -> {}  ({:?} comparison, {} pages compared)", r.a.display(), r.b.display(), r.mode, r.pages_compared);
    if let (Some(w), Some(same)) = (r.written_pages, r.identical_rewrites) {
        println!("written after A: {w} pages, of which {same} rewritten with identical contents");
    }
    println!(
        "changed: {} pages ({} KiB) in {} runs, {} ranges (gap {} pages)",
        r.changed_pages,
        r.changed_pages * 4,
        r.runs.len(),
        r.ranges.len(),
        r.gap_pages
    );
    for g in &r.ranges {
        println!(
            "  {:#014x}..{:#014x}  {:>8} changed of {:>8} pages",
            g.start,
            g.end,
            g.pages,
            (g.end - g.start) / 4096
        );
    }
    match (&r.virt, &r.virt_error) {
        (Some(v), _) => {
            println!("by virtual range (vCPU 0, root {:#x}):", v.context.root);
            for g in &v.regions {
                println!(
                    "  {:#018x}..{:#018x} -> {:#014x}  {:>8} changed pages",
                    g.va_start, g.va_end, g.pa_start, g.pages
                );
            }
            println!("  unmapped: {} pages", v.unmapped_pages);
        }
        (None, Some(e)) => println!("virtual ranges: not available: {e}"),
        (None, None) => {}
    }
    eprintln!("ferry: diff took {:.3} s", r.elapsed_secs);
    Ok(0)
}

/// Prints page statistics of one or more images.
pub fn stats(a: StatsArgs) -> Result<u8> {
    let key = a.key_file.as_deref().map(UserKey::from_file).transpose()?;
    let mut opts = ferry_inspect::StatsOptions { compress_every: a.compress_every, ..Default::default() };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let r = ferry_inspect::stats(&a.images, key.as_ref(), &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    for i in &r.images {
        println!("{}", i.path.display());
        println!(
            "  pages {}  zero {}  non-zero {}  unique non-zero {}  duplicates {}",
            i.ram_pages, i.zero_pages, i.nonzero_pages, i.unique_nonzero_pages, i.duplicate_pages
        );
        let h: Vec<String> =
            i.entropy_histogram.iter().enumerate().map(|(b, n)| format!("{b}-{}:{n}", b + 1)).collect();
        println!("  entropy (bits/byte: non-zero pages) {}", h.join(" "));
        println!(
            "  compress (every {} page, 4 KiB each, {} pages): lz4 {:.2}x  zstd-{} {:.2}x",
            r.compress_every, i.compress.sampled_pages, i.compress.lz4_ratio, r.zstd_level, i.compress.zstd_ratio
        );
        println!(
            "  {:.1} MiB of non-zero memory in {:.3} s",
            i.bytes_analysed as f64 / (1 << 20) as f64,
            i.elapsed_secs
        );
    }
    let s = &r.sharing;
    println!(
        "sharing: {} pages, {} unique contents: {} pages ({} MiB) saved by merging identical pages",
        s.total_pages,
        s.unique_pages,
        s.pages_saved,
        s.bytes_saved >> 20
    );
    Ok(0)
}

/// `ferry image redact`.
#[derive(Args)]
pub struct RedactArgs {
    /// The image (its parents are read through the chain; the copy is a full image).
    pub image: PathBuf,
    /// The redacted image to write (its report goes to OUT.redaction.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Physical range to overwrite, START..END (end exclusive) or START+LEN; repeatable.
    #[arg(long, value_parser = parse_range)]
    pub range: Vec<ferry_inspect::PhysRange>,
    /// Text whose every match is overwritten (UTF-8 bytes); repeatable.
    #[arg(long)]
    pub string: Vec<String>,
    /// Bytes whose every match is overwritten, in hex; repeatable.
    #[arg(long)]
    pub hex: Vec<String>,
    /// A YARA rule file (as for `ferry image scan --rules`): the matches of every rule
    /// whose condition holds are overwritten, reported by rule name.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Byte written over redacted bytes (0..=255).
    #[arg(long, value_parser = parse_u64, default_value = "0")]
    pub fill: u64,
    /// Key file: opens an encrypted image, and the copy is encrypted with it.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Threads searching at once (default: the CPUs, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn parse_range(s: &str) -> Result<ferry_inspect::PhysRange, String> {
    s.parse().map_err(|e: ferry_inspect::Error| e.to_string())
}

/// Shows bytes written on a terminal (stderr), at most five times a second.
fn redact_progress(
    step: ferry_inspect::RedactStep,
    done: u64,
    total: u64,
    last: &std::cell::Cell<Option<std::time::Instant>>,
) {
    let now = std::time::Instant::now();
    if total == 0 {
        eprint!("\r\x1b[Kredact: {step}");
    } else if last.get().is_none_or(|t| now.duration_since(t).as_millis() >= 200) || done >= total {
        eprint!("\r\x1b[Kredact: {step}: {} of {} MiB", done >> 20, total >> 20);
    } else {
        return;
    }
    last.set(Some(now));
}

/// Writes a redacted copy and prints what was redacted.
pub fn redact(a: RedactArgs) -> Result<u8> {
    use std::io::IsTerminal;
    let Ok(fill) = u8::try_from(a.fill) else { bail!("--fill {} is not a byte (0..=255)", a.fill) };
    let mut patterns = Vec::new();
    for s in &a.string {
        patterns.push(Pattern::string(s)?);
    }
    for h in &a.hex {
        patterns.push(Pattern::hex(h)?);
    }
    let rules = a.rules.as_deref().map(YaraRules::from_file).transpose()?;
    let key = a.key_file.as_deref().map(UserKey::from_file).transpose()?;
    let last = std::cell::Cell::new(None);
    let show = |s, d, t| redact_progress(s, d, t, &last);
    let tty = !a.json && std::io::stderr().is_terminal();
    let spec = ferry_inspect::RedactSpec {
        ranges: a.range.clone(),
        patterns,
        rules: rules.as_ref(),
        fill,
        threads: a.threads.unwrap_or(0),
        progress: if tty { Some(&show) } else { None },
    };
    let r = ferry_inspect::redact(&a.image, &a.out, key.as_ref(), &spec);
    if tty && last.get().is_some() {
        eprintln!();
    }
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    const SHOWN: usize = 50;
    for d in r.redactions.iter().take(SHOWN) {
        let why = match &d.cause {
            ferry_inspect::Cause::Range { index } => format!("range {index}"),
            ferry_inspect::Cause::Pattern { index } => {
                let kind = r.patterns.get(*index).map_or("pattern", |p| p.kind.as_str());
                format!("{kind} pattern {index}")
            }
            ferry_inspect::Cause::Rule { rule } => format!("rule {rule}"),
        };
        println!("{:#014x}  {:>8} bytes  {why}", d.start, d.len);
    }
    if r.redactions.len() > SHOWN {
        println!("... {} more in the report", r.redactions.len() - SHOWN);
    }
    for p in &r.patterns {
        println!("{} pattern {} ({} bytes): {} match(es)", p.kind, p.index, p.len, p.matches);
    }
    println!(
        "redacted {} bytes in {} pages ({} ranges, {} matches), fill {:#04x}; no match left",
        r.bytes_redacted,
        r.pages_touched,
        r.ranges.len(),
        r.redactions.len() - r.ranges.len(),
        r.fill
    );
    println!(
        "wrote {} (full image{}, root {}) in {:.3} s",
        r.output.display(),
        if r.encrypted { ", encrypted" } else { "" },
        r.output_root_hash,
        r.elapsed_secs
    );
    println!("report {}", r.report_path.display());
    let p = &r.phases;
    eprintln!(
        "ferry: verify input {:.3} s, scan {:.3} s, write {:.3} s, check copy {:.3} s",
        p.verify_input_secs, p.scan_secs, p.write_secs, p.check_secs
    );
    Ok(0)
}

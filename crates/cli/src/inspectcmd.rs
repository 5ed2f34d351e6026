//! `ferry image read|maps|scan`: memory analysis of an image. Parses,
//! calls `ferry-inspect`, prints for a person or as JSON.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ferry_image::UserKey;
use ferry_inspect::{ImageMem, Literals, PagingContext, Pattern, ScanOptions};

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
    let mut pats = Vec::new();
    for s in &a.string {
        pats.push(Pattern::string(s)?);
    }
    for h in &a.hex {
        pats.push(Pattern::hex(h)?);
    }
    if pats.is_empty() {
        bail!("give at least one --string or --hex pattern");
    }
    let matcher = Literals::new(pats)?;
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
    let r = ferry_inspect::scan(&mut mem, &matcher, &opts)?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    for m in &r.matches {
        let va: Vec<String> = m.va.iter().map(|v| format!("{v:#x}")).collect();
        println!("{:#014x}  {}  va {}", m.pa, m.pattern, if va.is_empty() { "-".into() } else { va.join(",") });
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

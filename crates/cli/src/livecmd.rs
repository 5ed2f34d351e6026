//! `ferry read|maps|scan --api-sock S`: memory analysis of a running VM
//! through its API (the same analyses as `ferry image read|maps|scan`, on
//! live memory). Parses, calls the API, prints for a person or as JSON.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::inspectcmd::parse_u64;

/// A scan or pass of a large guest can take a while; the API answers when done.
const SCAN_TIMEOUT: Duration = Duration::from_secs(600);

/// Parses `250ms`, `10s`, `2m` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?}: expected a duration such as 500ms, 10s or 2m"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(0.001..=86_400.0).contains(&secs) {
        return Err(format!("{s:?}: must be from 1ms to 24h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The VM to talk to and the output format.
#[derive(Args)]
pub struct LiveCommon {
    /// The VM's API socket (`ferry run --api-sock`).
    #[arg(long)]
    pub api_sock: PathBuf,
    /// JSON output (JSON lines for `scan --watch`).
    #[arg(long)]
    pub json: bool,
}

/// Which page tables to walk on the running VM.
#[derive(Args)]
pub struct LiveTables {
    /// Walk this vCPU's page tables (its CR3/CR4/EFER, read in a short pause); default 0.
    #[arg(long)]
    pub vcpu: Option<usize>,
    /// Walk the page tables at this physical address (paging mode of the vCPU).
    #[arg(long, value_parser = parse_u64)]
    pub cr3: Option<u64>,
}

/// `ferry read`.
#[derive(Args)]
pub struct LiveReadArgs {
    #[command(flatten)]
    common: LiveCommon,
    /// Guest-physical address to read.
    #[arg(long, value_parser = parse_u64, required_unless_present = "virt", conflicts_with = "virt")]
    phys: Option<u64>,
    /// Virtual address to read through the page tables.
    #[arg(long, value_parser = parse_u64)]
    virt: Option<u64>,
    /// Bytes to read (at most 1 MiB over the API).
    #[arg(long, value_parser = parse_u64, default_value = "64")]
    len: u64,
    #[command(flatten)]
    tables: LiveTables,
}

/// `ferry maps`.
#[derive(Args)]
pub struct LiveMapsArgs {
    #[command(flatten)]
    common: LiveCommon,
    #[command(flatten)]
    tables: LiveTables,
}

/// `ferry scan`.
#[derive(Args)]
pub struct LiveScanArgs {
    #[command(flatten)]
    common: LiveCommon,
    /// Text to search for (UTF-8 bytes); repeatable.
    #[arg(long)]
    string: Vec<String>,
    /// Bytes to search for, in hex (`deadbeef`, `0xde ad`); repeatable.
    #[arg(long)]
    hex: Vec<String>,
    /// A YARA rule file (as for `ferry image scan --rules`), sent to the VM as text; with
    /// `--watch`, conditions are evaluated over all of memory on every pass.
    #[arg(long, conflicts_with_all = ["string", "hex"])]
    rules: Option<PathBuf>,
    /// Name virtual addresses through this vCPU's page tables (default 0).
    #[arg(long, conflicts_with = "no_virt")]
    vcpu: Option<usize>,
    /// Do not look up virtual addresses (no pause at all).
    #[arg(long)]
    no_virt: bool,
    /// Matches to list per scan or pass (all are counted; at most 10000).
    #[arg(long, default_value_t = 1000)]
    max_matches: usize,
    /// Keep scanning: after the first pass, only the pages written since the previous one.
    #[arg(long)]
    watch: bool,
    /// Time between the starts of two passes (`--watch`).
    #[arg(long, value_parser = parse_duration, default_value = "10s", requires = "watch")]
    every: Duration,
    /// Stop after this many passes (`--watch`; default: until interrupted).
    #[arg(long, requires = "watch")]
    passes: Option<u64>,
}

/// Largest rule file sent over the API (its JSON-quoted text must fit in a request body).
const MAX_API_RULES: u64 = 512 << 10;

fn call(sock: &std::path::Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    crate::http::request(sock, method, path, body, SCAN_TIMEOUT).with_context(|| format!("{method} {path}"))
}

fn tables_body(t: &LiveTables) -> Value {
    let mut b = json!({});
    if let Some(v) = t.vcpu {
        b["vcpu"] = json!(v);
    }
    if let Some(c) = t.cr3 {
        b["cr3"] = json!(c);
    }
    b
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `ferry read --api-sock`.
pub fn read(a: LiveReadArgs) -> Result<u8> {
    let mut body = tables_body(&a.tables);
    body["len"] = json!(a.len);
    match (a.phys, a.virt) {
        (Some(p), _) => body["phys"] = json!(p),
        (None, Some(v)) => body["virt"] = json!(v),
        (None, None) => bail!("give --phys or --virt"),
    }
    let v = call(&a.common.api_sock, "PUT", "/vm/memory/read", Some(&body))?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if let Some(pa) = a.phys {
        crate::inspectcmd::hexdump(pa, &unhex(v["bytes"].as_str().unwrap_or("")));
        return Ok(0);
    }
    let r = &v["read"];
    println!("{}-level paging, root {:#x}", u(&r["context"]["levels"]), u(&r["context"]["root"]));
    for s in v["translation"]["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:<4} [{:3}] at {:#014x} = {:#018x}",
            s["level"].as_str().unwrap_or("?"),
            u(&s["index"]),
            u(&s["entry_addr"]),
            u(&s["entry"])
        );
    }
    for p in r["pieces"].as_array().into_iter().flatten() {
        println!(
            "{:#018x} -> {:#014x}  {:>5} bytes  {} page",
            u(&p["va"]),
            u(&p["pa"]),
            u(&p["len"]),
            crate::inspectcmd::size_name(u(&p["page_size"]))
        );
    }
    crate::inspectcmd::hexdump(u(&r["va"]), &unhex(r["bytes"].as_str().unwrap_or("")));
    Ok(0)
}

/// `ferry maps --api-sock`.
pub fn maps(a: LiveMapsArgs) -> Result<u8> {
    let v = call(&a.common.api_sock, "PUT", "/vm/memory/maps", Some(&tables_body(&a.tables)))?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{}-level paging, root {:#x}", u(&v["context"]["levels"]), u(&v["context"]["root"]));
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    for m in &runs {
        let (s, e) = (u(&m["va_start"]), u(&m["va_end"]));
        println!(
            "{s:#018x}-{e:#018x} -> {:#014x}  {:>10} KiB  {} pages",
            u(&m["pa_start"]),
            e.wrapping_sub(s) >> 10,
            crate::inspectcmd::size_name(u(&m["page_size"]))
        );
    }
    println!(
        "{} runs, {} MiB mapped ({} 4K, {} 2M, {} 1G pages) from {} tables{}",
        runs.len(),
        u(&v["mapped_bytes"]) >> 20,
        u(&v["pages_4k"]),
        u(&v["pages_2m"]),
        u(&v["pages_1g"]),
        u(&v["tables"]),
        if v["truncated"] == true { "; TRUNCATED" } else { "" }
    );
    Ok(0)
}

fn vas(m: &Value) -> String {
    let v: Vec<String> = m["va"].as_array().into_iter().flatten().map(|x| format!("{:#x}", u(x))).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// Shows "scanning..." on a terminal while a request runs; cleared by [`done`].
fn busy(what: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r{what}...");
    }
}

fn done() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
}

/// `rule:$pattern` for a YARA match, the pattern's name otherwise.
fn match_name(m: &Value) -> String {
    let pattern = m["pattern"].as_str().unwrap_or("?");
    match m["rule"].as_str() {
        Some(r) => format!("{r}:{pattern}"),
        None => pattern.to_string(),
    }
}

/// Reads a rule file for the request body, bounded.
fn rules_text(path: &std::path::Path) -> Result<String> {
    let len = std::fs::metadata(path).with_context(|| format!("rule file {}", path.display()))?.len();
    if len > MAX_API_RULES {
        bail!(
            "rule file {} has {len} bytes; at most {MAX_API_RULES} go over the API (use `ferry image scan --rules` on a snapshot)",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading rule file {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("rule file {}: not UTF-8 text (byte {})", path.display(), e.utf8_error().valid_up_to())
    })
}

/// The rule file's name as the VM's messages give it: the path, or its last part if the path
/// is too long for the API's limit.
fn rules_origin(path: &std::path::Path) -> String {
    let full = path.display().to_string();
    if full.len() <= ferry_inspect::MAX_RULES_ORIGIN && !full.chars().any(char::is_control) {
        return full;
    }
    let name: String = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

fn print_pass(p: &Value, json_out: bool) -> Result<()> {
    for m in p["new_matches"].as_array().into_iter().flatten() {
        if json_out {
            let mut line = m.clone();
            line["type"] = json!("match");
            line["watch"] = p["watch"].clone();
            println!("{}", serde_json::to_string(&line)?);
        } else {
            println!("pass {:>3}  {:#014x}  {}  va {}", u(&m["pass"]), u(&m["pa"]), match_name(m), vas(m));
        }
    }
    if json_out {
        let mut line = p.clone();
        if let Some(o) = line.as_object_mut() {
            o.remove("new_matches");
        }
        line["type"] = json!("pass");
        println!("{}", serde_json::to_string(&line)?);
    } else {
        println!(
            "pass {:>3}: {} {} dirty pages, scanned {} pages ({:.1} MiB) in {:.1} ms; {} new match(es), {} known{}",
            u(&p["pass"]),
            if p["full"] == true { "full," } else { "" },
            u(&p["dirty_pages"]),
            u(&p["pages_scanned"]),
            u(&p["bytes_scanned"]) as f64 / (1 << 20) as f64,
            p["scan_ms"].as_f64().unwrap_or(0.0),
            u(&p["new_total"]),
            u(&p["known_matches"]),
            p["registers_pause_ms"]
                .as_f64()
                .map_or(String::new(), |ms| format!("; guest paused {ms:.2} ms for registers"))
        );
    }
    if !json_out {
        if let Some(now) = p["matching_rules"].as_array() {
            let names = |v: &[Value]| v.iter().filter_map(|r| r.as_str()).collect::<Vec<_>>().join(", ");
            let new = p["new_rules"].as_array().map(|v| v.as_slice()).unwrap_or_default();
            println!(
                "          {} rule(s) hold{}{}; {} known match(es) re-read from unwritten pages",
                now.len(),
                if now.is_empty() { String::new() } else { format!(": {}", names(now)) },
                if new.is_empty() { String::new() } else { format!(" (new: {})", names(new)) },
                u(&p["refed_matches"])
            );
        }
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    Ok(())
}

/// `ferry scan --api-sock [--watch]`.
pub fn scan(a: LiveScanArgs) -> Result<u8> {
    let mut body = match &a.rules {
        Some(path) => json!({
            "rules": rules_text(path)?,
            "rules_origin": rules_origin(path),
            "max_matches": a.max_matches,
        }),
        None if a.string.is_empty() && a.hex.is_empty() => {
            bail!("give at least one --string or --hex pattern, or --rules FILE")
        }
        None => json!({ "strings": a.string, "hex": a.hex, "max_matches": a.max_matches }),
    };
    if !a.no_virt {
        body["vcpu"] = json!(a.vcpu.unwrap_or(0));
    }
    let sock = &a.common.api_sock;
    if !a.watch {
        busy("scanning");
        let r = call(sock, "PUT", "/vm/scan", Some(&body));
        done();
        let v = r?;
        if a.common.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(0);
        }
        for m in v["matches"].as_array().into_iter().flatten() {
            println!("{:#014x}  {}  va {}", u(&m["pa"]), match_name(m), vas(m));
        }
        if let Some(y) = v.get("yara") {
            let names: Vec<&str> =
                y["matching_rules"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            println!(
                "{} of {} rule(s) matched{}",
                names.len(),
                u(&y["rules"]),
                if names.is_empty() { String::new() } else { format!(": {}", names.join(", ")) }
            );
        }
        let secs = v["elapsed_secs"].as_f64().unwrap_or(0.0);
        println!(
            "{} match(es){}; scanned {:.1} MiB of {} MiB of RAM in {:.3} s ({:.2} GB/s)",
            u(&v["total_matches"]),
            if v["truncated"] == true { ", first listed" } else { "" },
            u(&v["bytes_scanned"]) as f64 / (1 << 20) as f64,
            u(&v["ram_bytes"]) >> 20,
            secs,
            u(&v["bytes_scanned"]) as f64 / secs.max(1e-9) / 1e9
        );
        return Ok(0);
    }
    // The VMM ends a watch left idle (300 s by default): ask for three intervals, so that
    // a slow `--every` keeps its watch while one late pass does not.
    let idle_s = (a.every.as_secs_f64() * 3.0).ceil() as u64;
    body["idle_s"] = json!(idle_s.clamp(300, ferry_inspect::MAX_WATCH_IDLE_S));
    let start = Instant::now();
    busy("pass 1 (all of RAM)");
    let first = call(sock, "PUT", "/vm/scan/watch", Some(&body));
    done();
    let first = first?;
    let id = u(&first["watch"]);
    print_pass(&first, a.common.json)?;
    let path = format!("/vm/scan/watch/{id}");
    let mut pass = 1u64;
    let r = loop {
        if a.passes.is_some_and(|n| pass >= n) {
            break Ok(0);
        }
        let due = start + a.every.mul_f64(pass as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        busy(&format!("pass {}", pass + 1));
        let p = call(sock, "PUT", &path, Some(&json!({})));
        done();
        match p {
            Ok(p) => print_pass(&p, a.common.json)?,
            Err(e) => break Err(e),
        }
        pass += 1;
    };
    // Free the VMM's dirty view now rather than at expiry.
    let _ = call(sock, "DELETE", &path, None);
    r
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_take_ms_s_and_m_and_refuse_the_rest() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "10h", "0s", "0.0001ms", "-1s", "1e9s", "100000s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

//! End to end: memory analysis of a running guest through its API
//! (`ferry read|maps|scan --api-sock`), incremental scanning with
//! `--watch`, and what a watch must not disturb (incremental snapshots,
//! pause/resume) or accept (bad input).

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn fails(args: &[&str], expect: &str) {
    let o = ferry_cmd(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ferry {args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(expect), "ferry {args:?}: expected {expect:?} in {err}");
}

/// One request on the API socket: (status, JSON body).
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let r = raw_http(sock, req.as_bytes());
    let status = r.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let v = serde_json::from_str(r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("null")).unwrap_or_default();
    (status, v)
}

/// Planted across the 4 KiB boundary at 0x401000; the guest never writes there again.
const PLANT: &[u8] = b"FERRY-LIVE-51c0de";
const AT: u64 = 0x401000 - 7;

#[test]
fn live_read_maps_and_scan_equal_a_snapshot_and_refuse_bad_input() {
    let cmdline = format!("idle report=1000 plant={}@{AT:#x}", hex(PLANT));
    let (g, sock) = running_guest(&cmdline, "64M");
    assert!(g.seen.iter().any(|l| l.starts_with("PLANTED")), "{:?}", g.seen);
    let at = format!("{AT:#x}");

    // Live reads, by physical and by virtual address (vCPU 0's page tables, read in a short pause).
    let phys = ok_json(&["read", "--api-sock", s(&sock), "--phys", &at, "--len", "8192", "--json"]);
    let virt = ok_json(&["read", "--api-sock", s(&sock), "--virt", &at, "--len", "8192", "--vcpu", "0", "--json"]);
    assert!(phys["bytes"].as_str().unwrap().starts_with(&hex(PLANT)));
    assert_eq!(virt["read"]["bytes"], phys["bytes"], "identity-mapped: virtual = physical");
    assert_eq!(virt["translation"]["pa"], AT);
    let maps = ok_json(&["maps", "--api-sock", s(&sock), "--json"]);
    assert!(maps["mapped_bytes"].as_u64().unwrap() >= 64 << 20, "{maps}");

    // The same through a snapshot of the same guest.
    let img = g.path("live.img");
    snapshot_ok(&sock, &img, &[]);
    let iphys = ok_json(&["image", "read", s(&img), "--phys", &at, "--len", "8192", "--json"]);
    assert_eq!(iphys["bytes"], phys["bytes"], "a page the guest does not write reads the same live and in the image");
    let iv = ok_json(&["image", "read", s(&img), "--virt", &at, "--len", "8192", "--json"]);
    assert_eq!(iv["read"]["pieces"], virt["read"]["pieces"]);
    let imaps = ok_json(&["image", "maps", s(&img), "--json"]);
    assert_eq!(imaps["runs"], maps["runs"]);

    // A live scan finds the planted bytes, with their virtual address.
    // (The guest's own parsed copies of the plant= bytes match too: look for the planted place.)
    let r = ok_json(&["scan", "--api-sock", s(&sock), "--string", "FERRY-LIVE-51c0de", "--json"]);
    let m = r["matches"].as_array().unwrap().iter().find(|m| m["pa"] == AT).unwrap_or_else(|| panic!("{r}")).clone();
    assert_eq!(m["va"][0], AT);
    assert_eq!(r["bytes_scanned"], r["ram_bytes"]);

    // Bad input: clear errors, never a panic or a 500.
    fails(&["read", "--api-sock", s(&sock), "--phys", "0x40000000", "--len", "16"], "outside guest memory");
    fails(&["read", "--api-sock", s(&sock), "--phys", "0", "--len", "0"], "must be 1..=");
    fails(&["read", "--api-sock", s(&sock), "--virt", "0x1000", "--vcpu", "5"], "vCPU 5 does not exist");
    fails(&["read", "--api-sock", s(&sock), "--virt", "0x100000000000"], "not present");
    fails(&["maps", "--api-sock", s(&sock), "--cr3", "0x7fff0000000"], "outside guest memory");
    fails(&["scan", "--api-sock", s(&sock), "--hex", "abc"], "odd number of hex digits");
    for (m, p, b, want) in [
        ("PUT", "/vm/memory/read", "{\"phys\": -1}", 400),
        ("PUT", "/vm/memory/read", "{\"phys\": 1, \"virt\": 2}", 400),
        ("PUT", "/vm/memory/read", "{\"phys\": 0, \"len\": 2000000}", 400),
        ("PUT", "/vm/memory/read", "[1]", 400),
        ("PUT", "/vm/memory/maps", "{\"vcpu\": \"x\"}", 400),
        ("PUT", "/vm/scan", "{}", 400),
        ("PUT", "/vm/scan", "{\"strings\": [\"\"]}", 400),
        ("PUT", "/vm/scan", "{\"strings\": [\"a\"], \"bogus\": 1}", 400),
        ("PUT", "/vm/scan/watch", "{\"hex\": [\"0000\"]}", 400),
        ("PUT", "/vm/scan/watch/999", "", 404),
        ("DELETE", "/vm/scan/watch/999", "", 404),
        ("PUT", "/vm/scan/watch/abc", "", 404),
        ("GET", "/vm/scan/watch/1", "", 405),
        ("GET", "/vm/scan", "", 405),
    ] {
        let (st, v) = http(&sock, m, p, b);
        assert_eq!(st, want, "{m} {p} {b}: {v}");
        assert!(v["error"].is_string(), "{m} {p}: {v}");
    }

    // Watches are bounded: the ninth is refused with 409 until one ends.
    let mut ids = Vec::new();
    for _ in 0..8 {
        let (st, v) = http(&sock, "PUT", "/vm/scan/watch", "{\"strings\": [\"FERRY-LIVE-51c0de\"]}");
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["pass"], 1);
        assert!(v["new_matches"].as_array().unwrap().iter().any(|m| m["pa"] == AT), "{v}");
        ids.push(v["watch"].as_u64().unwrap());
    }
    let (st, v) = http(&sock, "PUT", "/vm/scan/watch", "{\"strings\": [\"x\"]}");
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("too many watches"), "{v}");
    assert_eq!(http(&sock, "GET", "/vm/scan/watch", "").1["watches"].as_array().unwrap().len(), 8);
    let (st, v) = http(&sock, "PUT", &format!("/vm/scan/watch/{}", ids[0]), "{\"x\": 1}");
    assert_eq!(st, 400, "{v}");
    let (st, v) = http(&sock, "PUT", &format!("/vm/scan/watch/{}", ids[0]), "");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["pass"], 2);
    assert!(!v["new_matches"].as_array().unwrap().iter().any(|m| m["pa"] == AT), "a known match is not new again: {v}");
    // Passes of one watch from several clients at once: each runs or gets a clear 409.
    let path = format!("/vm/scan/watch/{}", ids[1]);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (sock, path) = (sock.clone(), path.clone());
            std::thread::spawn(move || (0..5).map(|_| http(&sock, "PUT", &path, "")).collect::<Vec<_>>())
        })
        .collect();
    let answers: Vec<(u16, Value)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    for (st, v) in &answers {
        assert!(*st == 200 || (*st == 409 && v["error"].as_str().unwrap().contains("running a pass")), "{st} {v}");
    }
    let ran = answers.iter().filter(|a| a.0 == 200).count() as u64;
    assert!(ran > 0);
    let listed = http(&sock, "GET", "/vm/scan/watch", "").1;
    let w = listed["watches"].as_array().unwrap().iter().find(|w| w["watch"] == ids[1]).unwrap().clone();
    assert_eq!(w["passes"].as_u64().unwrap(), 1 + ran, "every pass that answered 200 ran once: {w}");
    for id in &ids {
        assert_eq!(http(&sock, "DELETE", &format!("/vm/scan/watch/{id}"), "").0, 200);
    }
    assert_eq!(http(&sock, "DELETE", &format!("/vm/scan/watch/{}", ids[0]), "").0, 404);
    assert_eq!(http(&sock, "PUT", "/vm/scan/watch", "{\"strings\": [\"x\"]}").0, 200, "room again");

    // A watch asked to expire after 1 s idle is gone after 2.5 s without a pass (its dirty
    // view with it); bad idle times are refused.
    let (st, v) = http(&sock, "PUT", "/vm/scan/watch", "{\"strings\": [\"x\"], \"idle_s\": 1}");
    assert_eq!(st, 200, "{v}");
    let short = v["watch"].as_u64().unwrap();
    let listed = http(&sock, "GET", "/vm/scan/watch", "").1;
    let w = listed["watches"].as_array().unwrap().iter().find(|w| w["watch"] == short).unwrap().clone();
    assert_eq!(w["expires_after_s"], 1, "{w}");
    std::thread::sleep(Duration::from_millis(2500));
    let (st, v) = http(&sock, "PUT", &format!("/vm/scan/watch/{short}"), "");
    assert_eq!(st, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired after 1 s"), "{v}");
    assert!(!http(&sock, "GET", "/vm/scan/watch", "").1["watches"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["watch"] == short));
    for bad in ["0", "172801", "-1"] {
        let (st, v) = http(&sock, "PUT", "/vm/scan/watch", &format!("{{\"strings\": [\"x\"], \"idle_s\": {bad}}}"));
        assert_eq!(st, 400, "idle_s {bad}: {v}");
    }
}

/// JSON lines of a `ferry scan --watch --json` run: (pass lines, match lines).
fn watch_lines(out: &[u8]) -> (Vec<Value>, Vec<Value>) {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let passes = lines.iter().filter(|l| l["type"] == "pass").cloned().collect();
    let matches = lines.iter().filter(|l| l["type"] == "match").cloned().collect();
    (passes, matches)
}

#[test]
fn watch_finds_a_pattern_planted_after_its_first_pass_scanning_only_dirty_pages() {
    // Planted at the start of page 0x2001000, 5 s after boot: only that page
    // (and whatever the idle guest writes) is dirty. The hex pattern starts
    // with 4 zero bytes of the clean page before it, so its match crosses a
    // dirty/clean page boundary.
    const LATE: &[u8] = b"LATE-PLANT-9e21";
    let at: u64 = 0x2001000;
    let cmdline = format!("idle report=1000 plant={}@{at:#x} plant_after=5000", hex(LATE));
    let (g, sock) = running_guest(&cmdline, "128M");
    assert!(!g.seen.iter().any(|l| l.starts_with("PLANTED")), "planted too early: {:?}", g.seen);
    let across = format!("00000000{}", hex(LATE));
    let o = ferry_cmd(&[
        "scan",
        "--api-sock",
        s(&sock),
        "--string",
        "LATE-PLANT-9e21",
        "--hex",
        &across,
        "--watch",
        "--every",
        "500ms",
        "--passes",
        "24",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (passes, matches) = watch_lines(&o.stdout);
    assert_eq!(passes.len(), 24);
    let first = &passes[0];
    assert_eq!(first["full"], true);
    let ram_pages = first["ram_bytes"].as_u64().unwrap() / 4096;
    assert_eq!(first["pages_scanned"], ram_pages);
    let paused =
        first["registers_pause_ms"].as_f64().unwrap_or_else(|| panic!("vCPU 0's registers were read: {first}"));
    assert!(paused < 1000.0, "{first}");
    // The guest's own parsed copies of the plant= bytes (its stack, its
    // statics) match as well: look at the planted place.
    let at_pa = |pa: u64| matches.iter().filter(|m| m["pa"] == pa).cloned().collect::<Vec<_>>();
    let m1 = at_pa(at);
    let m2 = at_pa(at - 4);
    assert_eq!(m1.len(), 1, "{matches:?}");
    assert_eq!(m2.len(), 1, "the match starting in the clean page is found: {matches:?}");
    assert!(m1[0]["pattern"].as_str().unwrap().contains("LATE-PLANT"));
    assert!(m2[0]["pattern"].as_str().unwrap().starts_with("hex 00000000"));
    assert_eq!(m1[0]["va"][0], at, "identity-mapped");
    assert!(m1[0]["pass"].as_u64().unwrap() >= 2, "found after the first pass: {m1:?}");
    assert_eq!(m1[0]["pass"], m2[0]["pass"]);
    for p in &passes[1..] {
        assert_eq!(p["full"], false);
        let scanned = p["pages_scanned"].as_u64().unwrap();
        assert!(scanned * 100 < ram_pages, "a later pass scans far fewer pages than the first: {p}");
        assert!(scanned >= p["dirty_pages"].as_u64().unwrap());
    }
}

/// Pause/resume cycles through the API; each succeeds or is a clear 409.
fn pause_resume_cycles(sock: &Path, n: usize) -> usize {
    let mut done = 0;
    for _ in 0..n {
        for cmd in ["/vm/pause", "/vm/resume"] {
            let (st, v) = http(sock, "PUT", cmd, "");
            assert!(st == 200 || st == 202 || st == 409, "{cmd}: {st} {v}");
            done += (st != 409) as usize;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done
}

#[test]
fn an_incremental_snapshot_taken_while_a_watch_runs_is_complete() {
    // 2000 pages/s through a 64 MiB working set: the watch's passes take the
    // pages the guest writes; the lineage must still see every one of them.
    let (g, sock) = running_guest("dirty wss=64 rate=2000 fill=random report=100", "256M");
    let full = g.path("full.img");
    snapshot_ok(&sock, &full, &[]);
    let ws = sock.clone();
    let watch = std::thread::spawn(move || {
        ferry_cmd(&[
            "scan",
            "--api-sock",
            s(&ws),
            "--hex",
            "f00dfacef00dface",
            "--watch",
            "--every",
            "200ms",
            "--passes",
            "20",
            "--json",
        ])
    });
    std::thread::sleep(Duration::from_millis(1500));
    // A client pausing and resuming meanwhile: all succeed or get a 409.
    let ps = sock.clone();
    let pauser = std::thread::spawn(move || pause_resume_cycles(&ps, 10));
    let inc = g.path("inc.img");
    let deadline = Instant::now() + secs(30);
    let stats = loop {
        let o = snapshot(&sock, &inc, &["--parent", s(&full), "--digest"]);
        if o.status.success() {
            break serde_json::from_slice::<Value>(&o.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("409") || err.contains("in progress"), "{err}");
        assert!(Instant::now() < deadline, "snapshot kept being refused: {err}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(pauser.join().unwrap() > 0, "some pauses and resumes went through");
    let o = watch.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (passes, _) = watch_lines(&o.stdout);
    assert_eq!(passes.len(), 20);
    assert!(
        passes[1..].iter().any(|p| p["dirty_pages"].as_u64().unwrap() > 100),
        "the guest dirtied pages: {passes:?}"
    );
    assert_eq!(api("status", &sock)["state"], "running");
    let (_r, rsock) = {
        let dir = tempfile::tempdir().unwrap();
        let rs = dir.path().join("r.sock");
        let gr = Guest::start_restore(dir, &[s(&inc), "--paused", "--api-sock", s(&rs)]);
        wait_sock(&rs);
        (gr, rs)
    };
    assert_eq!(
        api("digest", &rsock)["digest"],
        stats["memory_digest"],
        "the chain holds every page written since the full image, including those the watch read"
    );
}

/// Hex of `b`, spaced for a YARA hex pattern.
fn yara_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn a_watch_with_yara_rules_evaluates_conditions_over_all_of_memory() {
    // Two plants side by side make "WATCH-RULE-PAIR-7d3e" at 0x2001000, 5 s
    // after boot. The guest's parsed copies of each half lie apart, so the
    // whole string is only at the planted place.
    let (h1, h2): (&[u8], &[u8]) = (b"WATCH-RULE-", b"PAIR-7d3e");
    let at: u64 = 0x2001000;
    let cmdline = format!(
        "idle report=1000 plant={}@{at:#x} plant={}@{:#x} plant_after=5000",
        hex(h1),
        hex(h2),
        at + h1.len() as u64
    );
    let (g, sock) = running_guest(&cmdline, "128M");
    assert!(!g.seen.iter().any(|l| l.starts_with("PLANTED")), "planted too early: {:?}", g.seen);
    // The guest's code at 1 MiB is never written: a pattern there matches in
    // memory that no later pass reads, unless the watch re-reads known matches.
    let code = ok_json(&["read", "--api-sock", s(&sock), "--phys", "0x100000", "--len", "24", "--json"]);
    let code = unhex(code["bytes"].as_str().unwrap());
    assert!(code.iter().any(|&b| b != 0), "code at 1 MiB: {code:?}");
    let rules = g.path("watch.yar");
    std::fs::write(
        &rules,
        format!(
            "rule static_code {{ strings: $c = {{ {c} }} condition: $c }}\n\
             rule late_pair {{ strings: $code = {{ {c} }} $p = \"WATCH-RULE-PAIR-7d3e\" condition: $code and $p }}\n\
             rule twice {{ strings: $p = \"WATCH-RULE-PAIR-7d3e\" condition: #p >= 2 }}\n\
             private rule hidden {{ strings: $h = {{ {c} }} condition: $h }}\n\
             rule uses_hidden {{ condition: hidden and static_code }}\n",
            c = yara_hex(&code)
        ),
    )
    .unwrap();
    let o = ferry_cmd(&[
        "scan",
        "--api-sock",
        s(&sock),
        "--rules",
        s(&rules),
        "--watch",
        "--every",
        "500ms",
        "--passes",
        "20",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (passes, matches) = watch_lines(&o.stdout);
    assert_eq!(passes.len(), 20);
    let names =
        |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect() };
    // Before the plant: the code's rules hold (one through a private rule, never listed).
    assert_eq!(passes[0]["full"], true);
    assert_eq!(names(&passes[0]["matching_rules"]), ["static_code", "uses_hidden"], "{}", passes[0]);
    let k = passes
        .iter()
        .position(|p| names(&p["matching_rules"]).contains(&"late_pair".to_string()))
        .unwrap_or_else(|| panic!("late_pair never held: {passes:?}"));
    assert!(k >= 1, "late_pair held before the plant: {passes:?}");
    let p = &passes[k];
    assert_eq!(p["full"], false, "{p}");
    assert_eq!(names(&p["new_rules"]), ["late_pair"], "{p}");
    assert!(p["refed_matches"].as_u64().unwrap() >= 1, "the code match was re-read, not rescanned: {p}");
    let ram_pages = passes[0]["ram_bytes"].as_u64().unwrap() / 4096;
    assert!(p["pages_scanned"].as_u64().unwrap() * 100 < ram_pages, "{p}");
    // Its matches are new in that pass: the string at the planted place and the code.
    let of = |rule: &str, pattern: &str| -> Vec<Value> {
        matches.iter().filter(|m| m["rule"] == rule && m["pattern"] == pattern).cloned().collect()
    };
    let pm = of("late_pair", "$p");
    assert_eq!(pm.len(), 1, "{matches:?}");
    assert_eq!(pm[0]["pa"], at);
    assert_eq!(pm[0]["va"][0], at, "identity-mapped");
    assert_eq!(pm[0]["pass"].as_u64().unwrap(), k as u64 + 1);
    let cm = of("late_pair", "$code");
    assert_eq!(cm.len(), 1, "{matches:?}");
    assert_eq!(cm[0]["pa"], 0x100000);
    assert_eq!(of("static_code", "$c")[0]["pass"], 1);
    assert!(of("twice", "$p").is_empty() && of("hidden", "$h").is_empty(), "{matches:?}");
    // Later passes: the rules keep holding on re-read matches, and nothing is new again.
    for p in &passes[k + 1..] {
        let now = names(&p["matching_rules"]);
        assert!(now.contains(&"late_pair".to_string()) && now.contains(&"uses_hidden".to_string()), "{p}");
        assert_eq!(p["new_total"], 0, "{p}");
    }
    let total: usize = passes.iter().map(|p| p["new_total"].as_u64().unwrap() as usize).sum();
    assert_eq!(total, matches.len(), "every new match is listed once");

    // A one-shot live scan with the same rules equals a scan of a snapshot.
    let live = ok_json(&["scan", "--api-sock", s(&sock), "--rules", s(&rules), "--json"]);
    let img = g.path("rules.img");
    snapshot_ok(&sock, &img, &[]);
    let image = ok_json(&["image", "scan", s(&img), "--rules", s(&rules), "--json"]);
    assert_eq!(live["yara"]["matching_rules"], image["yara"]["matching_rules"]);
    let key = |v: &Value| -> Vec<(String, String, u64)> {
        v["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (m["rule"].as_str().unwrap().into(), m["pattern"].as_str().unwrap().into(), m["pa"].as_u64().unwrap())
            })
            .collect()
    };
    assert_eq!(key(&live), key(&image));
    assert!(key(&live).contains(&("late_pair".into(), "$p".into(), at)));

    // Bad rules: clear errors naming the rule, before anything is scanned.
    let bad = g.path("bad.yar");
    std::fs::write(&bad, "import \"pe\"\nrule uses_pe { condition: pe.is_pe }\n").unwrap();
    fails(&["scan", "--api-sock", s(&sock), "--rules", s(&bad)], "uses_pe");
    std::fs::write(&bad, "rule broken { strings: $a = \"x\" condition: $b }\n").unwrap();
    fails(&["scan", "--api-sock", s(&sock), "--rules", s(&bad), "--watch", "--passes", "2"], "bad.yar");
    std::fs::write(&bad, "rule zeros { strings: $z = { 00 00 00 00 } condition: $z }\n").unwrap();
    fails(&["scan", "--api-sock", s(&sock), "--rules", s(&bad), "--watch", "--passes", "2"], "cannot be watched");
    fails(&["scan", "--api-sock", s(&sock), "--rules", s(&rules), "--string", "x"], "cannot be used with");
    for (body, want) in [
        ("{\"rules\": \"rule r { condition: filesize > 0 }\"}", "filesize"),
        ("{\"rules\": \"rule r { strings: $a = \\\"x\\\" condition: $a }\", \"strings\": [\"y\"]}", "not both"),
        ("{\"rules\": \"rule r { condition: true }\", \"rules_origin\": \"a\\nb\"}", "control characters"),
        ("{\"rules\": 7}", "invalid"),
    ] {
        let (st, v) = http(&sock, "PUT", "/vm/scan", body);
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{body}: {v}");
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

//! Bad input gets a clear error and a non-zero exit, never a panic or a hang.

mod common;
use common::*;
use std::process::Command;

fn run_err(args: &[&str]) -> (Option<i32>, String) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let out = ferry_cmd(&full);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "ferry panicked: {err}");
    (out.status.code(), err)
}

#[test]
fn missing_kernel_file() {
    let (code, err) = run_err(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot read kernel /nonexistent/vmlinuz"), "{err}");
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "just some text, not a kernel\n".repeat(100)).unwrap();
    let (code, err) = run_err(&["--kernel", p.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a kernel ferry can boot"), "{err}");
}

#[test]
fn kernel_larger_than_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.elf");
    let mut bytes = b"\x7fELF".to_vec();
    bytes.resize(40 << 20, 0);
    std::fs::write(&p, bytes).unwrap();
    let (code, err) = run_err(&["--kernel", p.to_str().unwrap(), "--mem", "32M"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("larger than guest memory"), "{err}");
}

#[test]
fn elf_without_pvh_note() {
    // The ferry binary itself is an ELF, but not a PVH kernel.
    let (code, err) = run_err(&["--kernel", ferry(), "--mem", "512M"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load kernel"), "{err}");
}

#[test]
fn memory_size_zero_and_too_large() {
    let (code, err) = run_err(&["--kernel", "builtin:test", "--mem", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("memory size must be greater than zero"), "{err}");
    let (code, err) = run_err(&["--kernel", "builtin:test", "--mem", "900000000G"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid memory size"), "{err}");
    let (code, err) = run_err(&["--kernel", "builtin:test", "--mem", "12X"]);
    assert_eq!(code, Some(2), "clap rejects the flag");
    assert!(err.contains("invalid memory size unit"), "{err}");
}

#[test]
fn vcpu_count_out_of_range() {
    for n in ["0", "33"] {
        let (code, err) = run_err(&["--kernel", "builtin:test", "--vcpus", n]);
        assert_eq!(code, Some(1));
        assert!(err.contains(&format!("invalid vCPU count {n}: must be between 1 and 32")), "{err}");
    }
}

#[test]
fn api_socket_path_taken() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut g = Guest::start_in(
        dir,
        &["--kernel", "builtin:test", "--mem", "32M", "--cmdline", "idle", "--api-sock", sock.to_str().unwrap()],
    );
    g.wait_line("FERRY-GUEST boot", secs(60));
    wait_sock(&sock);
    let (code, err) = run_err(&["--kernel", "builtin:test", "--mem", "32M", "--api-sock", sock.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already in use"), "{err}");
    // A regular file at the path is not replaced.
    let f = g.path("file");
    std::fs::write(&f, "keep me").unwrap();
    let (code, err) = run_err(&["--kernel", "builtin:test", "--mem", "32M", "--api-sock", f.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep me");
}

#[test]
fn malformed_api_requests_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut g = Guest::start_in(
        dir,
        &["--kernel", "builtin:test", "--mem", "32M", "--cmdline", "idle", "--api-sock", sock.to_str().unwrap()],
    );
    g.wait_line("FERRY-GUEST boot", secs(60));
    wait_sock(&sock);
    let cases: [(&[u8], &str); 6] = [
        (b"this is not http\r\n\r\n", "400"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        (b"DELETE /vm HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        (b"PUT /vm/shutdown HTTP/1.1\r\nContent-Length: 9\r\n\r\n{not json", "400"),
        (b"PUT /vm/shutdown HTTP/1.1\r\nContent-Length: 22\r\n\r\n{\"timeout_ms\": \"soon\"}", "400"),
        (b"PUT /vm/console HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "400"),
    ];
    for (req, status) in cases {
        let resp = raw_http(&sock, req);
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{:?} -> {resp}", String::from_utf8_lossy(req));
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // The VM is unharmed.
    assert_eq!(api("status", &sock)["state"], "running");
}

#[test]
fn triple_fault_is_reported_and_exits_nonzero() {
    let mut g = Guest::start(&["--kernel", "builtin:test", "--mem", "32M", "--cmdline", "crash=triple"]);
    let st = g.wait_exit(secs(60));
    assert_eq!(st.code(), Some(125));
    let err = g.stderr_lines().join("\n");
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("RIP="), "{err}");
}

#[test]
fn emulation_failure_is_reported_with_instruction_bytes() {
    let mut g = Guest::start(&["--kernel", "builtin:test", "--mem", "32M", "--cmdline", "crash=mmio-exec"]);
    let st = g.wait_exit(secs(60));
    assert_eq!(st.code(), Some(125));
    let err = g.stderr_lines().join("\n");
    assert!(err.contains("guest crashed"), "{err}");
    assert!(err.contains("RIP=0xd0000000") || err.contains("emulation"), "{err}");
}

#[test]
fn no_permission_on_dev_kvm() {
    // Run as an unprivileged user: /dev/kvm is root-only on these hosts.
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("setpriv missing; skipping");
        return;
    }
    let meta = std::fs::metadata("/dev/kvm");
    if let Ok(m) = &meta {
        use std::os::unix::fs::PermissionsExt;
        if m.permissions().mode() & 0o006 != 0 {
            eprintln!("/dev/kvm is world-accessible here; skipping");
            return;
        }
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            ferry(),
            "run",
            "--kernel",
            "builtin:test",
            "--mem",
            "32M",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/kvm") && err.contains("permission denied"), "{err}");
}

#[test]
fn no_dev_kvm_at_all() {
    // Hide /dev behind an empty tmpfs in a private mount namespace.
    let script = format!("mount -t tmpfs none /dev && exec {} run --kernel builtin:test --mem 32M", ferry());
    let out = match Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output()
    {
        Ok(o) => o,
        Err(_) => return eprintln!("unshare missing; skipping"),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("unshare failed") || err.contains("Operation not permitted") {
        return eprintln!("cannot create a mount namespace here; skipping: {err}");
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/kvm") && err.contains("KVM is not available"), "{err}");
}

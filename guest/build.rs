//! Builds the guest program (payload/) into a PVH ELF with the host rustc and
//! the host target only: no_std, panic=abort, static, no PIE, our own linker
//! script. A fresh machine needs nothing but rustc and a C linker driver.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let payload = manifest.join("payload");
    let script = payload.join("link.ld");
    let elf = out.join("ferry-guest.elf");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", payload.display());
    for entry in std::fs::read_dir(&payload).expect("read payload/") {
        println!("cargo:rerun-if-changed={}", entry.expect("dir entry").path().display());
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition=2021",
        "--crate-type=bin",
        "--crate-name=ferry_guest_payload",
        "--target=x86_64-unknown-linux-gnu",
        "-Cpanic=abort",
        "-Copt-level=2",
        "-Ccodegen-units=1",
        "-Cdebuginfo=0",
        "-Cstrip=debuginfo",
        "-Crelocation-model=static",
        "-Ctarget-feature=+crt-static",
        "-Cforce-frame-pointers=no",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-static",
        "-Clink-arg=-no-pie",
        "-Clink-arg=-Wl,--build-id=none",
        "-Clink-arg=-Wl,-z,max-page-size=4096",
    ])
    .arg(format!("-Clink-arg=-Wl,-T,{}", script.display()))
    .arg("-o")
    .arg(&elf)
    .arg(payload.join("main.rs"))
    // Flags meant for the host crates (e.g. RUSTFLAGS=-Dwarnings or a
    // coverage/sanitizer setup) must not leak into the guest build.
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("RUSTFLAGS");

    let status = cmd.status().expect("failed to run rustc for the guest payload");
    assert!(status.success(), "building the guest payload failed: {status}");
}

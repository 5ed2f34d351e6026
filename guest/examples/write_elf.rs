//! Writes the embedded guest ELF to a file, for booting it in another VMM:
//! `cargo run -p ferry-guest --example write_elf -- guest.elf`.

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "ferry-guest.elf".into());
    std::fs::write(&path, ferry_guest::ELF).expect("write ELF");
    println!("{path}: {} bytes", ferry_guest::ELF.len());
}

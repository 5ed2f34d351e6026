//! `ferry image verify|inspect|export|read|maps|scan|diff|stats|mount|redact`: working with image files offline
//! (the analysis commands live in `inspectcmd`).

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_image::{ImageChain, UserKey};

/// Image subcommands.
#[derive(Subcommand)]
pub enum ImageCmd {
    /// Check every hash of an image (and its parents): chunks, state, root.
    Verify {
        /// The image.
        image: PathBuf,
        /// Key file for encrypted images.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Print header, RAM ranges, vCPU registers, chain and sizes.
    Inspect {
        /// The image.
        image: PathBuf,
        /// Key file for encrypted images (without it only public fields show).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Export guest memory for forensic tools.
    Export {
        /// The image.
        image: PathBuf,
        /// lime, elf (core file as QEMU's dump-guest-memory writes) or raw.
        #[arg(long)]
        format: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Key file for encrypted images.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Read guest memory at a physical address, or at a virtual one through the saved page tables.
    Read(crate::inspectcmd::ReadArgs),
    /// List the virtual ranges a vCPU's page tables map, merged into runs.
    Maps(crate::inspectcmd::MapsArgs),
    /// Search guest memory for strings or hex patterns (physical and virtual addresses).
    Scan(crate::inspectcmd::ScanArgs),
    /// List the pages whose contents differ between two images (reads only B's newer records when B descends from A).
    Diff(crate::inspectcmd::DiffArgs),
    /// Zero, duplicate (within and across images), entropy and compressibility statistics of pages.
    Stats(crate::inspectcmd::StatsArgs),
    /// Show the image as read-only files (pmem, core.elf, mem.lime, info.json, vcpu/N/regs.json) via FUSE.
    Mount(crate::mountcmd::MountArgs),
    /// Write a copy with ranges and pattern matches overwritten, re-hashed (re-encrypted), plus an audit report.
    Redact(crate::inspectcmd::RedactArgs),
}

fn key(f: &Option<PathBuf>) -> Result<Option<UserKey>> {
    Ok(match f {
        Some(f) => Some(UserKey::from_file(f)?),
        None => None,
    })
}

/// Runs an image subcommand.
pub fn run(cmd: ImageCmd) -> Result<u8> {
    match cmd {
        ImageCmd::Verify { image, key_file } => {
            let k = key(&key_file)?;
            let mut chain = ImageChain::open(&image, k.as_ref())?;
            let reports = chain.verify()?;
            for r in &reports {
                println!("{}", serde_json::to_string(r)?);
            }
            eprintln!("ferry: {} OK ({} image(s) in the chain)", image.display(), reports.len());
            Ok(0)
        }
        ImageCmd::Inspect { image, key_file, json } => {
            let k = key(&key_file)?;
            let mut reader = ferry_image::ImageReader::open(&image, k.as_ref())?;
            let header = reader.header().clone();
            // Without the key, an encrypted image shows only its public header fields.
            let cpus = match reader.cpus() {
                Ok(c) => c,
                Err(ferry_image::Error::KeyRequired { .. }) => vec![],
                Err(e) => return Err(e.into()),
            };
            let file_bytes = std::fs::metadata(&image)?.len();
            let mem: u64 = header.ranges.iter().map(|r| r.len).sum();
            let chain = ImageChain::open(&image, k.as_ref())
                .map(|c| c.images().iter().map(|i| i.path().display().to_string()).collect::<Vec<_>>());
            let v = serde_json::json!({
                "path": image,
                "root_hash": reader.root_hash().to_string(),
                "header": header,
                "chunks": reader.chunk_count(),
                "file_bytes": file_bytes,
                "guest_memory_bytes": mem,
                "chain": chain.as_ref().map_err(|e| e.to_string()),
                "vcpus": cpus,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("image      {}", image.display());
                println!(
                    "format     v{}  codec {:?}  chunk {} KiB  encrypted {}",
                    header.format_version,
                    header.codec,
                    header.chunk_size >> 10,
                    header.encryption.is_some()
                );
                println!("root hash  {}", reader.root_hash());
                println!("created    {} (unix)  id {}", header.created_unix_secs, header.image_id);
                println!("vm         {}", header.vm_config);
                for r in &header.ranges {
                    println!("ram        {:#014x}..{:#014x} ({} MiB)", r.start, r.start + r.len, r.len >> 20);
                }
                println!(
                    "size       {} bytes in {} chunks for {} MiB of guest memory",
                    file_bytes,
                    reader.chunk_count(),
                    mem >> 20
                );
                match (&header.parent, &chain) {
                    (Some(p), Ok(c)) => {
                        println!("parent     {} ({})  chain: {}", p.path_hint, p.root_hash, c.join(" <- "))
                    }
                    (Some(p), Err(e)) => println!("parent     {} ({})  BROKEN: {e}", p.path_hint, p.root_hash),
                    (None, _) => println!("parent     none (full image)"),
                }
                for (i, c) in cpus.iter().enumerate() {
                    println!(
                        "vcpu {i}     rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} cpl={}",
                        c.rip, c.rsp, c.rflags, c.cr0, c.cr3, c.cr4, c.efer, c.cs.selector, c.cs.selector & 3
                    );
                    println!(
                        "           rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
                        c.rax, c.rbx, c.rcx, c.rdx, c.rsi, c.rdi, c.rbp
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Read(a) => crate::inspectcmd::read(a),
        ImageCmd::Maps(a) => crate::inspectcmd::maps(a),
        ImageCmd::Scan(a) => crate::inspectcmd::scan(a),
        ImageCmd::Diff(a) => crate::inspectcmd::diff(a),
        ImageCmd::Stats(a) => crate::inspectcmd::stats(a),
        ImageCmd::Mount(a) => crate::mountcmd::mount(a),
        ImageCmd::Redact(a) => crate::inspectcmd::redact(a),
        ImageCmd::Export { image, format, out, key_file } => {
            let k = key(&key_file)?;
            let mut chain = ImageChain::open(&image, k.as_ref())?;
            let Some(fmt) = ferry_image::ExportFormat::parse(&format) else {
                bail!("unknown export format {format:?}: use lime, elf or raw")
            };
            let layout = fmt.layout(&mut chain)?;
            let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
            let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            let res = layout.write_to(&mut chain, &mut w);
            let done = res.map_err(anyhow::Error::from).and_then(|n| {
                w.flush()?;
                w.get_ref().sync_all()?;
                std::fs::rename(&tmp, &out)?;
                Ok(n)
            });
            match done {
                Ok(n) => {
                    eprintln!("ferry: wrote {} ({n} bytes, {format})", out.display());
                    Ok(0)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }
    }
}

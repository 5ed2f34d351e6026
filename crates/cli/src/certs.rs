//! `ferry certs init|issue`: the CA and certificates for TLS migration.
//!
//! Thin glue over `ferry_migrate::certs`; see there for what the files are
//! and why they are made the way they are.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use ferry_migrate::certs;

/// Certificate subcommands.
#[derive(Subcommand)]
pub enum CertsCmd {
    /// Create a CA for migration: DIR/ca.pem (give it to every host) and DIR/ca.key (mode 0600).
    Init {
        /// Directory for the CA (created, mode 0700, if missing); an existing CA is never replaced.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for a host, signed by the CA in DIR: DIR/NAME.pem and DIR/NAME.key.
    Issue {
        /// Directory holding the CA made by `ferry certs init`.
        #[arg(long)]
        dir: PathBuf,
        /// The host's name (DNS name or IPv4 address): the name peers check
        /// and the one destination allow-lists name. Valid as server and client.
        #[arg(long)]
        name: String,
    },
}

/// Run a `ferry certs` subcommand; prints the files written.
pub fn run(cmd: CertsCmd) -> Result<u8> {
    match cmd {
        CertsCmd::Init { dir } => {
            let ca = certs::init_ca(&dir).with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!("CA certificate: {}", ca.cert.display());
            println!("CA key:         {} (mode 0600; needed only to issue certificates)", ca.key.display());
        }
        CertsCmd::Issue { dir, name } => {
            let issued = certs::issue(&dir, &name)
                .with_context(|| format!("issuing a certificate for {name:?} with the CA in {}", dir.display()))?;
            let until = certs::format_utc(issued.not_after);
            println!(
                "certificate: {} (for {:?}, server and client use, valid until {until})",
                issued.cert.display(),
                issued.name
            );
            println!("key:         {} (mode 0600)", issued.key.display());
            println!("CA:          {}", certs::ca_paths(&dir).cert.display());
        }
    }
    Ok(0)
}

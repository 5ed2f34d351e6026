//! JSON output: `--json` prints it instead of the tables, `--json-out FILE`
//! writes it as well, so a run can be read by a person and kept for a program.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Writes `value` to `json_out` when given, then prints it (`json`) or calls
/// `table` to print the human-readable form.
pub(crate) fn emit(value: &impl Serialize, json: bool, json_out: Option<&Path>, table: impl FnOnce()) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if let Some(p) = json_out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    if json {
        println!("{text}");
    } else {
        table();
    }
    Ok(())
}

//! Memory sizes given on a command line, in one place so that `ferry run --mem`
//! and `ferry bench --mem` mean the same thing.

/// Parses `256`, `256M`, `256MiB`, `1G`, `1GiB`, `4096K` into bytes (a bare number is MiB).
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid memory size {s:?}: expected a number of MiB or a size like 512M or 1G"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "k" | "kb" | "kib" => 1 << 10,
        _ => return Err(format!("invalid memory size unit {unit:?} in {s:?}: use K, M or G")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("memory size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::parse_mem;

    #[test]
    fn units() {
        assert_eq!(parse_mem("256"), Ok(256 << 20));
        assert_eq!(parse_mem("512M"), Ok(512 << 20));
        assert_eq!(parse_mem("1G"), Ok(1 << 30));
        assert_eq!(parse_mem("2GiB"), Ok(2 << 30));
        assert!(parse_mem("lots").is_err());
        assert!(parse_mem("5T").is_err());
        assert!(parse_mem("99999999999999999999G").is_err());
    }
}

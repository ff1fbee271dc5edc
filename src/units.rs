//! Sizes as people write them on command lines.

/// Why a text is not a size; each quotes the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{text:?}: unknown unit {unit:?} (use K, M, G or T)")]
    Unit { text: String, unit: char },
    #[error("{0:?} is not a size like 512M or 4G")]
    NotASize(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses `4096`, `64K`, `512M`, `4G` (binary units, optional `iB`/`B` suffix) into bytes.
pub fn parse_size(text: &str) -> Result<usize, SizeError> {
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(SizeError::Unit { text: text.to_string(), unit: c }),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: usize = digits.trim().parse().map_err(|_| SizeError::NotASize(text.to_string()))?;
    n.checked_mul(1usize << shift).ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// Bytes as a size to read: `64M`, `1.5G`, `512K`, `100` (binary units).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (scale, unit) in UNITS {
        if b >= scale {
            let v = b as f64 / scale as f64;
            return if v.fract() == 0.0 { format!("{v:.0}{unit}") } else { format!("{v:.1}{unit}") };
        }
    }
    format!("{b}")
}

/// The check behind the `parse_size` fuzz target (`fuzz/fuzz_targets/`), also run over
/// its committed corpus by `tests/snapshot_corpora.rs`. Not an API.
pub mod fuzzing {
    use super::parse_size;

    /// Each fuzz target's name (its directory under `fuzz/corpus/`) and its check.
    pub const TARGETS: &[(&str, crate::snapshot::fuzzing::Check)] = &[("parse_size", size)];

    /// The input (as lossy UTF-8) to [`parse_size`]: it never panics; an accepted size is
    /// what the digits say times a power of 1024 and parses back from its plain digits;
    /// a refusal quotes the text it refused.
    pub fn size(b: &[u8]) {
        let text = String::from_utf8_lossy(b);
        match parse_size(&text) {
            Ok(n) => {
                assert_eq!(parse_size(&n.to_string()), Ok(n), "{text:?} gave {n}, which does not parse back");
                let digits: String = text.chars().filter(char::is_ascii_digit).collect();
                let base: usize = digits.parse().expect("an accepted size has digits that fit");
                assert!(
                    (0..=40).step_by(10).any(|s| base.checked_mul(1 << s) == Some(n)),
                    "{text:?} gave {n}, not {base} times a unit"
                );
            }
            Err(e) => assert!(
                e.to_string().contains(&format!("{text:?}")),
                "the error {e:?} does not quote {text:?}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SizeError, parse_size};

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("12Q"), Err(SizeError::Unit { text: "12Q".into(), unit: 'Q' }));
        assert_eq!(
            parse_size("12Q").unwrap_err().to_string(),
            r#""12Q": unknown unit 'Q' (use K, M, G or T)"#
        );
        assert_eq!(parse_size("lots"), Err(SizeError::Unit { text: "lots".into(), unit: 's' }));
        assert_eq!(parse_size("xK"), Err(SizeError::NotASize("xK".into())));
        assert_eq!(parse_size("20000000000T"), Err(SizeError::TooLarge("20000000000T".into())));
    }
}

//! Units a user types: byte sizes (`512m`, `8g`, `123`) and durations (`30s`, `5m`, `250ms`), for
//! command-line flags (`cmd/common.rs` wraps them with the flag's name) and API and tokens-file
//! fields (`serve/`). Pure parsing.

use std::time::Duration;

/// `10G`, `512M`, `4k`, `123` (bytes); suffixes K, M, G, T are powers of 1024, either case.
pub fn bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// `30s`, `5m`, `1h`, `250ms` or plain seconds; positive. A clap `value_parser`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((value, "s"), |i| value.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 30s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{value:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{value:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(bytes("10G"), Some(10 << 30));
        assert_eq!(bytes("512m"), Some(512 << 20));
        assert_eq!(bytes(" 4k "), Some(4096));
        assert_eq!(bytes("123"), Some(123));
        assert_eq!(bytes("x"), None);
        assert_eq!(bytes("99999999T"), None, "overflow is refused, not wrapped");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}

//! Text that came from outside (a registry, a manifest, an image) made safe to show: printable
//! ASCII only and short, so a hostile peer cannot fill logs or paint a terminal with escape codes.

/// At most this many characters of untrusted text go into a message.
const MAX_REASON_CHARS: usize = 200;

/// Registry-controlled bytes as a short reason: printable ASCII only (anything else becomes `?`),
/// whitespace runs collapsed, at most 200 characters (then `...`).
pub fn sanitize(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut last_space = true;
    for &b in bytes {
        if out.len() >= MAX_REASON_CHARS {
            out.push_str("...");
            break;
        }
        let c = match b {
            b' ' | b'\t' | b'\r' | b'\n' => ' ',
            0x21..=0x7e => b as char,
            _ => '?',
        };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        out.push(c);
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_it_short_and_printable() {
        assert_eq!(sanitize(b"  not\n\n found\x1b[31m\xff "), "not found?[31m?");
        let long = sanitize(&[b'a'; 100_000]);
        assert_eq!(long.len(), MAX_REASON_CHARS + 3);
        assert!(long.ends_with("..."));
    }
}

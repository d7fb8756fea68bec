//! Entry metadata from tar headers and PAX records: owner, mode, mtime (with nanoseconds) and xattrs
//! (`SCHILY.xattr.*`, as written by GNU tar, Go and Python). Pure parsing; touches nothing.

use std::ffi::CString;
use std::io::{self, Read};

use super::safety::EntryPath;
use super::LayerError;

/// Metadata common to every entry kind.
pub(super) struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: libc::timespec,
    pub xattrs: Vec<(CString, Vec<u8>)>,
}

pub(super) fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &EntryPath,
) -> Result<Meta, LayerError> {
    let header = entry.header();
    let bad = |what: &str, e: io::Error| LayerError::BadName {
        entry: path.to_string(),
        reason: format!("bad {what} field: {e}"),
    };
    // Like Go's archive/tar (which wrote most layers), an empty numeric field reads as 0.
    let old = header.as_old();
    let mut uid = numeric(header.uid(), &old.uid).map_err(|e| bad("uid", e))?;
    let mut gid = numeric(header.gid(), &old.gid).map_err(|e| bad("gid", e))?;
    let mut mode =
        numeric(header.mode().map(u64::from), &old.mode).map_err(|e| bad("mode", e))? as u32;
    let mut mtime = libc::timespec {
        tv_sec: numeric(header.mtime(), &old.mtime).map_err(|e| bad("mtime", e))? as i64,
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(|e| bad("PAX", e))? {
        for ext in pax {
            let ext = ext.map_err(|e| bad("PAX", e))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
                let key =
                    CString::new(attr).map_err(|_| bad("xattr name", io::Error::other("NUL")))?;
                xattrs.push((key, value.to_vec()));
            } else if key == b"uid" {
                uid = parse_num(value)
                    .ok_or_else(|| bad("PAX uid", io::Error::other("not a number")))?;
            } else if key == b"gid" {
                gid = parse_num(value)
                    .ok_or_else(|| bad("PAX gid", io::Error::other("not a number")))?;
            } else if key == b"mtime" {
                mtime = parse_pax_time(value)
                    .ok_or_else(|| bad("PAX mtime", io::Error::other("not a time")))?;
            }
        }
    }
    mode &= 0o7777;
    let (uid, gid) = (
        u32::try_from(uid).map_err(|_| bad("uid", io::Error::other("too large")))?,
        u32::try_from(gid).map_err(|_| bad("gid", io::Error::other("too large")))?,
    );
    Ok(Meta {
        uid,
        gid,
        mode,
        mtime,
        xattrs,
    })
}

fn numeric(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        other => other,
    }
}

fn parse_num(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn parse_pax_time(value: &[u8]) -> Option<libc::timespec> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let tv_sec: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let tv_nsec = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(libc::timespec { tv_sec, tv_nsec })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_nanoseconds() {
        let t = parse_pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 500_000_000));
        assert_eq!(parse_pax_time(b"12").unwrap().tv_nsec, 0);
        assert!(parse_pax_time(b"x").is_none());
    }

    #[test]
    fn empty_numeric_fields_read_as_zero() {
        assert_eq!(numeric(Err(io::Error::other("x")), &[0; 8]).unwrap(), 0);
        assert!(numeric(Err(io::Error::other("x")), b"12x").is_err());
    }
}

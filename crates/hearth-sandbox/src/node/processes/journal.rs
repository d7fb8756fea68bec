//! A background process's kept output on disk, so that a daemon started after another (a restart,
//! an upgrade, one that replaced a daemon killed outright) still has what the old one had kept,
//! at the same offsets, and a client reconnecting with the offset it reached reads on where it
//! was (output that was in flight to a daemon killed outright is lost, never repeated). A fork's
//! children start with their parent's, written as their journals ([`write`]) before they attach.
//!
//! Each process has two files in its sandbox's journal directory: `N.out`, being written, and
//! `N.old`, the one before it. Each starts with [`MAGIC`] and the offset of its first byte (u64,
//! little-endian), then holds records: the stream (1 stdout, 2 stderr), the length (u32,
//! little-endian), the bytes. Once `N.out` holds [`KEPT`] bytes it becomes `N.old` (the older one
//! goes), so a process takes at most twice [`KEPT`] on disk and a load finds at least the last
//! [`KEPT`] bytes it produced. A record cut short (a daemon killed mid-write) ends what is read of
//! a file, and the next writer cuts it off. Files are owner-only: output can be secret.
//!
//! Written by the process's pump as output arrives (a `write` per chunk: the page cache absorbs
//! it); a failed write (a full disk) stops the journal, never the process, whose output stays
//! kept in memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::output::{Output, Stream, KEPT};

/// The first bytes of a journal file.
const MAGIC: &[u8; 8] = b"hearthj1";
/// Magic and first offset.
const HEADER: u64 = 16;
/// A record's stream and length.
const RECORD: u64 = 5;
/// Longest record written (longer chunks are split), and read.
const MAX_RECORD: usize = KEPT / 4;

/// Appends a process's output to its journal files.
pub(super) struct Journal {
    out: PathBuf,
    old: PathBuf,
    /// `None` once a write failed.
    file: Option<File>,
    /// Record bytes in `out`.
    written: u64,
    /// Offset after the last byte journalled.
    end: u64,
}

/// One journal file as read back.
struct Loaded {
    start: u64,
    chunks: Vec<(Stream, Bytes)>,
    /// Offset after its last byte.
    end: u64,
    /// Bytes of it that hold whole records (header included).
    good: u64,
}

impl Journal {
    /// Continues process `id`'s journal in `dir` at offset `end` (the output kept in memory ends
    /// there): appends to its `N.out` when that ends there too, else starts a new one.
    pub fn open(dir: &Path, id: u32, end: u64) -> Journal {
        let (out, old) = paths(dir, id);
        let mut journal = Journal {
            out,
            old,
            file: None,
            written: 0,
            end,
        };
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            journal.failed(&e);
            return journal;
        }
        let continued = match read(&journal.out) {
            Some(last) if last.end == end => std::fs::OpenOptions::new()
                .append(true)
                .open(&journal.out)
                .and_then(|file| {
                    // A record cut short goes: the next one follows the last whole one.
                    file.set_len(last.good)?;
                    Ok((file, last.good - HEADER))
                })
                .ok(),
            _ => None,
        };
        match continued {
            Some((file, written)) => {
                journal.file = Some(file);
                journal.written = written;
            }
            None => journal.start_file(),
        }
        journal
    }

    /// Appends output that starts at the journal's end.
    pub fn append(&mut self, stream: Stream, data: &[u8]) {
        for piece in data.chunks(MAX_RECORD) {
            if self.file.is_none() {
                return;
            }
            let len = piece.len() as u64;
            if self.written > 0 && self.written + RECORD + len > KEPT as u64 {
                self.rotate();
            }
            let Some(file) = &mut self.file else {
                return;
            };
            match write_record(file, stream, piece) {
                Ok(()) => {
                    self.written += RECORD + len;
                    self.end += len;
                }
                Err(e) => self.failed(&e),
            }
        }
    }

    /// Offset after the last byte journalled.
    #[cfg(test)]
    fn end(&self) -> u64 {
        self.end
    }

    /// `N.out` becomes `N.old` and a new `N.out` starts at the current end.
    fn rotate(&mut self) {
        self.file = None;
        if let Err(e) = std::fs::rename(&self.out, &self.old) {
            return self.failed(&e);
        }
        self.start_file();
    }

    /// A new, empty `N.out` starting at the current end.
    fn start_file(&mut self) {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&self.end.to_le_bytes());
        let made = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.out)
            .and_then(|mut file| file.write_all(&header).map(|()| file));
        match made {
            Ok(file) => {
                self.file = Some(file);
                self.written = 0;
            }
            Err(e) => self.failed(&e),
        }
    }

    fn failed(&mut self, e: &std::io::Error) {
        tracing::warn!(
            journal = %self.out.display(),
            "background process output is no longer kept on disk: {e}"
        );
        self.file = None;
    }
}

fn write_record(file: &mut File, stream: Stream, data: &[u8]) -> std::io::Result<()> {
    let mut record = Vec::with_capacity(RECORD as usize + data.len());
    record.push(match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    });
    record.extend_from_slice(&(data.len() as u32).to_le_bytes());
    record.extend_from_slice(data);
    file.write_all(&record)
}

/// The output of process `id` journalled in `dir` (empty when there is none).
pub(super) fn load(dir: &Path, id: u32) -> Output {
    let (out, old) = paths(dir, id);
    let (old, out) = (read(&old), read(&out));
    let files = match (old, out) {
        (Some(old), Some(out)) if old.end == out.start => vec![old, out],
        (_, Some(out)) => vec![out],
        // Cut off between the rotation's rename and the new file.
        (Some(old), None) => vec![old],
        (None, None) => return Output::new(),
    };
    let mut output = Output::starting_at(files[0].start);
    for file in files {
        for (stream, data) in file.chunks {
            output.push(stream, data);
        }
    }
    output
}

/// Writes `output` as process `id`'s journal in `dir`, in place of any (a fork's child starts
/// with what its parent had kept).
pub(super) fn write(dir: &Path, id: u32, output: &Output) {
    remove(dir, id);
    let mut journal = Journal::open(dir, id, output.dropped());
    let mut offset = output.dropped();
    while let Some((at, stream, data)) = output.read(offset) {
        journal.append(stream, &data);
        offset = at + data.len() as u64;
    }
}

/// Removes process `id`'s journal from `dir`.
pub(super) fn remove(dir: &Path, id: u32) {
    let (out, old) = paths(dir, id);
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(old);
}

fn paths(dir: &Path, id: u32) -> (PathBuf, PathBuf) {
    (dir.join(format!("{id}.out")), dir.join(format!("{id}.old")))
}

/// A journal file's whole records; `None` when it is missing or not a journal.
fn read(path: &Path) -> Option<Loaded> {
    let mut bytes = Vec::new();
    // No file this module writes is longer; a longer one is read only as far.
    let limit = HEADER + KEPT as u64 + RECORD + MAX_RECORD as u64;
    File::open(path)
        .ok()?
        .take(limit)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return None;
    }
    let start = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let bytes = Bytes::from(bytes);
    let mut at = HEADER as usize;
    let mut end = start;
    let mut chunks = Vec::new();
    while let Some(head) = bytes.get(at..at + RECORD as usize) {
        let stream = match head[0] {
            1 => Stream::Stdout,
            2 => Stream::Stderr,
            _ => break,
        };
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        let from = at + RECORD as usize;
        if len > MAX_RECORD || from + len > bytes.len() {
            break;
        }
        chunks.push((stream, bytes.slice(from..from + len)));
        end += len as u64;
        at = from + len;
    }
    Some(Loaded {
        start,
        chunks,
        end,
        good: at as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(output: &Output) -> (u64, String) {
        super::super::output::kept_text(output, 0)
    }

    #[test]
    fn output_comes_back_at_its_offsets_and_appends_continue_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1, 0);
        journal.append(Stream::Stdout, b"one\n");
        journal.append(Stream::Stderr, b"err\n");
        let output = load(dir.path(), 1);
        assert_eq!(text(&output), (0, "one\nerr\n".into()));
        assert_eq!(output.read(4).unwrap().1, Stream::Stderr);
        // The next daemon continues it where it ended.
        let mut journal = Journal::open(dir.path(), 1, output.end());
        journal.append(Stream::Stdout, b"two\n");
        assert_eq!(text(&load(dir.path(), 1)), (0, "one\nerr\ntwo\n".into()));
        // Another process's journal is its own; a missing one is empty.
        assert_eq!(load(dir.path(), 2).end(), 0);
        remove(dir.path(), 1);
        assert_eq!(load(dir.path(), 1).end(), 0);
    }

    #[test]
    fn rotation_bounds_the_files_and_keeps_at_least_the_last_kept_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 7, 0);
        let line = [b'x'; 1000];
        for _ in 0..(3 * KEPT / 1000) {
            journal.append(Stream::Stdout, &line);
        }
        let total = (3 * KEPT / 1000 * 1000) as u64;
        assert_eq!(journal.end(), total);
        for name in ["7.out", "7.old"] {
            let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(len <= HEADER + KEPT as u64, "{name}: {len}");
        }
        let output = load(dir.path(), 7);
        assert_eq!(output.end(), total);
        assert_eq!(output.dropped(), total - KEPT as u64, "the last KEPT bytes");
        // One chunk longer than a record is split, and still comes back whole.
        let big = vec![b'y'; 2 * MAX_RECORD + 3];
        journal.append(Stream::Stderr, &big);
        let output = load(dir.path(), 7);
        assert_eq!(output.end(), total + big.len() as u64);
    }

    #[test]
    fn a_record_cut_short_ends_the_file_and_the_next_writer_cuts_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1, 0);
        journal.append(Stream::Stdout, b"whole\n");
        drop(journal);
        // A daemon killed mid-write: a header promising more than follows.
        let path = dir.path().join("1.out");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(&[1, 100, 0, 0, 0, b'p', b'a']).unwrap();
        let output = load(dir.path(), 1);
        assert_eq!(text(&output), (0, "whole\n".into()));
        let mut journal = Journal::open(dir.path(), 1, output.end());
        journal.append(Stream::Stdout, b"next\n");
        assert_eq!(text(&load(dir.path(), 1)), (0, "whole\nnext\n".into()));
    }

    #[test]
    fn kept_output_written_as_a_journal_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut kept = Output::starting_at(100);
        kept.push(Stream::Stdout, Bytes::from_static(b"out\n"));
        kept.push(Stream::Stderr, Bytes::from_static(b"err\n"));
        std::fs::write(dir.path().join("3.old"), b"stale").unwrap();
        write(dir.path(), 3, &kept);
        let loaded = load(dir.path(), 3);
        assert_eq!(text(&loaded), (100, "out\nerr\n".into()));
        assert_eq!(loaded.read(104).unwrap().1, Stream::Stderr);
        assert!(!dir.path().join("3.old").exists(), "a stale file stayed");
        // And it goes on from there.
        let mut journal = Journal::open(dir.path(), 3, loaded.end());
        journal.append(Stream::Stdout, b"more\n");
        assert_eq!(load(dir.path(), 3).end(), 113);
    }

    #[test]
    fn what_is_not_a_journal_loads_as_nothing_and_a_mismatch_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.out"), b"not a journal at all").unwrap();
        assert_eq!(load(dir.path(), 1).end(), 0);
        std::fs::write(dir.path().join("2.out"), b"hea").unwrap();
        assert_eq!(load(dir.path(), 2).end(), 0);
        // Memory says the output ends at 50, the file at 0: the file starts again at 50.
        let mut journal = Journal::open(dir.path(), 1, 50);
        journal.append(Stream::Stdout, b"later\n");
        let output = load(dir.path(), 1);
        assert_eq!(text(&output), (50, "later\n".into()));
        assert_eq!(output.end(), 56);
    }
}

//! Thinning checked against a model of QEMU's loader: a thinned state loaded onto the template's
//! memory must give the guest the same RAM as the full state loaded onto zeroed memory.

use std::collections::HashMap;

use super::*;

const BLOCK: &str = "hearth-mem";
const PAGES: usize = 16;

/// A stream as QEMU 7.2 writes it for a stopped VM: header, configuration with the
/// `x-ignore-shared` capability, `ram` START (setup), PART (pages), END, then device state.
struct Writer {
    out: Vec<u8>,
    last: Option<String>,
    /// Pages of [`BLOCK`] sent so far.
    sent: Vec<bool>,
}

impl Writer {
    fn new(blocks: &[(&str, usize)]) -> Writer {
        let mut w = Writer {
            out: Vec::new(),
            last: None,
            sent: vec![false; PAGES],
        };
        w.out.extend(MAGIC.to_be_bytes());
        w.out.extend(VERSION.to_be_bytes());
        w.out.push(CONFIGURATION);
        w.out.extend(7u32.to_be_bytes());
        w.out.extend(b"microvm");
        w.out.push(SUBSECTION);
        w.name("configuration/capabilities");
        w.out.extend(1u32.to_be_bytes());
        w.out.extend(1u32.to_be_bytes());
        w.name("x-ignore-shared");
        w.out.push(SECTION_START);
        w.out.extend(2u32.to_be_bytes());
        w.name("ram");
        w.out.extend(0u32.to_be_bytes());
        w.out.extend(4u32.to_be_bytes());
        let total: usize = blocks.iter().map(|b| b.1).sum();
        w.out.extend((total as u64 | MEM_SIZE).to_be_bytes());
        for (name, len) in blocks {
            w.name(name);
            w.out.extend((*len as u64).to_be_bytes());
            w.out.extend(0u64.to_be_bytes());
        }
        w.out.extend(EOS.to_be_bytes());
        w.footer(2);
        w.out.push(SECTION_PART);
        w.out.extend(2u32.to_be_bytes());
        w
    }

    fn name(&mut self, name: &str) {
        self.out.push(name.len() as u8);
        self.out.extend(name.as_bytes());
    }

    fn footer(&mut self, id: u32) {
        self.out.push(SECTION_FOOTER);
        self.out.extend(id.to_be_bytes());
    }

    fn header(&mut self, block: &str, page: usize, kind: u64) {
        if block == BLOCK && page < PAGES {
            self.sent[page] = true;
        }
        let offset = (page * PAGE_SIZE) as u64;
        if self.last.as_deref() == Some(block) {
            self.out.extend((offset | kind | CONTINUE).to_be_bytes());
        } else {
            self.out.extend((offset | kind).to_be_bytes());
            self.name(block);
            self.last = Some(block.to_owned());
        }
    }

    fn page(&mut self, block: &str, page: usize, data: &[u8]) {
        self.header(block, page, PAGE);
        self.out.extend(data);
    }

    fn zero(&mut self, block: &str, page: usize) {
        self.header(block, page, ZERO);
        self.out.push(0);
    }

    /// Ends the PART (after the pages of [`BLOCK`] not sent yet, zero, as QEMU sends every page),
    /// writes an END with `end_pages`, then device state and EOF.
    fn finish(mut self, end_pages: &[(usize, Vec<u8>)]) -> Vec<u8> {
        for page in 0..PAGES {
            if !self.sent[page] {
                self.zero(BLOCK, page);
            }
        }
        self.out.extend(EOS.to_be_bytes());
        self.footer(2);
        self.out.push(SECTION_END);
        self.out.extend(2u32.to_be_bytes());
        for (page, data) in end_pages {
            self.page(BLOCK, *page, data);
        }
        self.out.extend(EOS.to_be_bytes());
        self.footer(2);
        self.out.push(0x04); // a device's full section, opaque
        self.out.extend(b"\0\0\0\x03device state bytes");
        self.out.push(0x00); // EOF
        self.out
    }
}

fn filled(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

/// QEMU's loader, reduced to RAM: applies the records onto `memory` (block name -> bytes) and
/// returns the device-state tail.
fn load(stream: &[u8], memory: &mut HashMap<String, Vec<u8>>) -> Vec<u8> {
    let mut at = 8;
    let take = |at: &mut usize, n: usize| {
        let s = &stream[*at..*at + n];
        *at += n;
        s
    };
    let be64 = |at: &mut usize| u64::from_be_bytes(take(at, 8).try_into().unwrap());
    let name = |at: &mut usize| {
        let n = take(at, 1)[0] as usize;
        String::from_utf8(take(at, n).to_vec()).unwrap()
    };
    // Configuration and the START header, as the writer above makes them.
    at += 1 + 4 + 7 + 1;
    name(&mut at);
    at += 4 + 4;
    name(&mut at);
    at += 1 + 4;
    name(&mut at);
    at += 8;
    let mut last: Option<String> = None;
    loop {
        let header = be64(&mut at);
        let flags = header & FLAG_BITS;
        let offset = (header & !FLAG_BITS) as usize;
        if flags & MEM_SIZE != 0 {
            let mut left = offset;
            while left > 0 {
                name(&mut at);
                left -= be64(&mut at) as usize;
                be64(&mut at);
            }
            continue;
        }
        if flags == EOS {
            at += 5; // footer
            match stream[at] {
                SECTION_PART | SECTION_END => at += 5,
                _ => return stream[at..].to_vec(),
            }
            continue;
        }
        let block = if flags & CONTINUE != 0 {
            last.clone().expect("CONTINUE after a named record")
        } else {
            name(&mut at)
        };
        last = Some(block.clone());
        let ram = memory.get_mut(&block).unwrap();
        let page = &mut ram[offset..offset + PAGE_SIZE];
        match flags & !CONTINUE {
            ZERO => {
                let fill = take(&mut at, 1)[0];
                page.fill(fill);
            }
            PAGE => page.copy_from_slice(take(&mut at, PAGE_SIZE)),
            other => panic!("flags {other:#x}"),
        }
    }
}

fn template() -> Vec<u8> {
    let mut base = vec![0u8; PAGES * PAGE_SIZE];
    for page in 0..8 {
        base[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(page as u8 + 1);
    }
    base
}

/// The first page where two memories differ, if any (the memories are too big to print).
fn first_difference(
    a: &HashMap<String, Vec<u8>>,
    b: &HashMap<String, Vec<u8>>,
) -> Option<(String, usize)> {
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let page = (0..a[name].len() / PAGE_SIZE).find(|&p| {
            a[name][p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                != b[name][p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        })?;
        Some((name.clone(), page))
    })
}

/// The template's data ranges as its file would report them: pages 0-7 hold data; the first
/// half of the rest is a hole, the second half data that is zero (written zeroes are data too).
fn data() -> Vec<Range<u64>> {
    let page = PAGE_SIZE as u64;
    vec![0..8 * page, 12 * page..PAGES as u64 * page]
}

fn thin_of(stream: &[u8], base: &[u8]) -> (Vec<u8>, Thinned) {
    let mut out = Vec::new();
    let data = data();
    // Bytes in the file's hole are never read (they are zero in the file): garbage here shows it.
    let mut bytes = base.to_vec();
    bytes[8 * PAGE_SIZE..12 * PAGE_SIZE].fill(0xee);
    let base = Base {
        bytes: &bytes,
        data: &data,
    };
    let done = thin(stream, &mut out, &base, BLOCK, true).unwrap();
    (out, done)
}

fn memory_of(stream: &[u8], start: Vec<u8>) -> (HashMap<String, Vec<u8>>, Vec<u8>) {
    let mut memory = HashMap::from([
        (BLOCK.to_owned(), start),
        ("bios".to_owned(), vec![0u8; 2 * PAGE_SIZE]),
    ]);
    let tail = load(stream, &mut memory);
    (memory, tail)
}

#[test]
fn a_thinned_state_on_its_template_loads_the_same_ram_as_the_full_state() {
    let base = template();
    let mut w = Writer::new(&[(BLOCK, PAGES * PAGE_SIZE), ("bios", 2 * PAGE_SIZE)]);
    w.page("bios", 0, &filled(0xbb)); // another block: kept
    w.page(BLOCK, 0, &filled(1)); // as the template: dropped
    w.page(BLOCK, 1, &filled(9)); // written by the guest: kept
    w.page(BLOCK, 2, &filled(3)); // as the template, after a kept one: dropped
    w.zero(BLOCK, 3); // zeroed by the guest, the template has data: kept
    w.zero(BLOCK, 9); // zero in both: dropped
    w.page(BLOCK, 10, &filled(7)); // written where the template is zero: kept
    w.page(BLOCK, 4, &filled(5)); // as the template, then sent again below: dropped here
    w.page(BLOCK, 5, &filled(0x55)); // differs, then sent again as the template: both kept
    w.page("bios", 1, &filled(0xbc));
    let stream = w.finish(&[(4, filled(0x44)), (5, filled(6))]);

    let (thinned, done) = thin_of(&stream, &base);
    let (full, full_tail) = memory_of(&stream, vec![0u8; PAGES * PAGE_SIZE]);
    let (restored, tail) = memory_of(&thinned, base.clone());
    assert_eq!(
        first_difference(&restored, &full),
        None,
        "the guest's RAM after a thin load"
    );
    assert_eq!(tail, full_tail, "device state is copied as it was");
    assert_eq!(done.dropped_pages, 3, "pages 0, 2 and 4's first sending");
    assert_eq!(
        done.dropped_zero, 7,
        "9, and 8 and 11-15 sent as zero at the end"
    );
    assert_eq!(
        done.kept_pages, 5,
        "1, 10, 5 (twice) and 4's second sending"
    );
    assert_eq!(done.bytes_in, stream.len() as u64);
    assert_eq!(done.bytes_out, thinned.len() as u64);
    assert!(thinned.len() < stream.len() - 3 * PAGE_SIZE);
}

#[test]
fn a_record_after_a_dropped_one_names_its_block_again() {
    let base = template();
    let mut w = Writer::new(&[(BLOCK, PAGES * PAGE_SIZE)]);
    // QEMU names the block once; the record that named it is dropped.
    w.page(BLOCK, 0, &filled(1));
    w.page(BLOCK, 1, &filled(0x11));
    w.page(BLOCK, 2, &filled(0x12));
    let stream = w.finish(&[]);
    let (thinned, done) = thin_of(&stream, &base);
    assert_eq!(done.dropped_pages, 1);
    let (restored, _) = memory_of(&thinned, base.clone());
    let (full, _) = memory_of(&stream, vec![0u8; PAGES * PAGE_SIZE]);
    assert_eq!(first_difference(&restored, &full), None);
}

#[test]
fn a_state_it_does_not_understand_is_refused_not_mangled() {
    let base = template();
    let data = data();
    let base = Base {
        bytes: &base,
        data: &data,
    };
    let refused = |stream: &[u8]| {
        let mut out = Vec::new();
        match thin(stream, &mut out, &base, BLOCK, true) {
            Err(ThinError::Unsupported(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let full = {
        let mut w = Writer::new(&[(BLOCK, PAGES * PAGE_SIZE)]);
        w.page(BLOCK, 1, &filled(2));
        w.finish(&[])
    };
    // Cut anywhere inside the RAM: refused (never a short file taken for a state).
    let ram_end = full.len() - 24;
    for cut in [4, 20, 60, 100, ram_end] {
        assert!(refused(&full[..cut]).contains("end"), "cut at {cut}");
    }
    assert!(refused(b"not a saved state").contains("not a QEMU saved state"));

    let mut w = Writer::new(&[(BLOCK, PAGES * PAGE_SIZE)]);
    w.header(BLOCK, 1, 0x100); // a compressed page
    assert!(refused(&w.finish(&[])).contains("RAM flags 0x100"));

    let mut w = Writer::new(&[(BLOCK, PAGES * PAGE_SIZE)]);
    w.page(BLOCK, PAGES, &filled(1)); // past the template
    assert!(refused(&w.finish(&[])).contains("past the template"));

    let w = Writer::new(&[(BLOCK, 2 * PAGES * PAGE_SIZE)]); // a VM of another size
    assert!(refused(&w.finish(&[])).contains("its template"));

    let mut stream = Writer::new(&[(BLOCK, PAGES * PAGE_SIZE)]).finish(&[]);
    let at = stream.windows(3).position(|w| w == b"ram").unwrap();
    stream[at..at + 3].copy_from_slice(b"blk"); // block migration: another iterable section
    assert!(refused(&stream).contains("iterable section \"blk\""));
}

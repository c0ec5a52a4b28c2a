//! A reader between a tar stream and the `tar` crate that refuses archives
//! whose metadata entries are too big. The `tar` crate reads a GNU long
//! name or long link (`L`, `K`) and a PAX header (`x`, `g`) whole into
//! memory, however large its size field says it is: one 100 MiB long name
//! (100 KB compressed) took the daemon to 861 MB. Go's archive/tar refuses
//! such headers over 1 MiB; so does this.
//!
//! The guard follows the stream block by block: a header, then its data
//! rounded up to 512 bytes (with the size from a preceding PAX `size`
//! record, and GNU sparse extension blocks accounted for).

use std::io::{self, Read};

/// Largest long name, long link or PAX header accepted.
pub const MAX_META_ENTRY: u64 = 1 << 20;

/// GNU sparse extension blocks accepted after one header: 21 regions
/// each, so about 43,000 regions. The tar crate keeps every region in
/// memory; with no bound, a stream of extension blocks grew that list
/// faster than the stream itself.
const MAX_SPARSE_EXT_BLOCKS: u32 = (MAX_META_ENTRY / BLOCK as u64) as u32;

const BLOCK: usize = 512;

pub struct HeaderLimit<R> {
    inner: R,
    /// The header block being assembled.
    header: Vec<u8>,
    /// Bytes of the current entry's data (padded) still to pass.
    data_left: u64,
    /// GNU sparse extension blocks follow the header.
    sparse_ext: bool,
    /// How many of them this entry has had.
    sparse_ext_blocks: u32,
    /// The sparse entry's data, passed once its extension blocks are.
    pending_data: u64,
    /// The data of a PAX header being collected (to find `size=`).
    pax: Option<Vec<u8>>,
    /// A size for the next entry set by a PAX header.
    next_size: Option<u64>,
}

impl<R: Read> HeaderLimit<R> {
    pub fn new(inner: R) -> Self {
        HeaderLimit {
            inner,
            header: Vec::with_capacity(BLOCK),
            data_left: 0,
            sparse_ext: false,
            sparse_ext_blocks: 0,
            pending_data: 0,
            pax: None,
            next_size: None,
        }
    }

    fn on_block(&mut self) -> io::Result<()> {
        let h = std::mem::take(&mut self.header);
        if self.sparse_ext {
            self.sparse_ext_blocks += 1;
            if self.sparse_ext_blocks > MAX_SPARSE_EXT_BLOCKS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "tar sparse entry with more than {MAX_SPARSE_EXT_BLOCKS} extension blocks"
                    ),
                ));
            }
            self.sparse_ext = h[504] != 0;
            if !self.sparse_ext {
                self.data_left = self.pending_data;
            }
            return Ok(());
        }
        if h.iter().all(|b| *b == 0) {
            return Ok(()); // end-of-archive blocks
        }
        let typ = h[156];
        let header_size = parse_size(&h[124..136])?;
        let extension = matches!(typ, b'x' | b'g' | b'L' | b'K');
        // As the tar crate: a PAX size applies to the next entry that is
        // not itself an extension header.
        let size = if extension {
            header_size
        } else {
            self.next_size.take().unwrap_or(header_size)
        };
        if extension && size > MAX_META_ENTRY {
            let what = match typ {
                b'L' => "GNU long name",
                b'K' => "GNU long link name",
                _ => "PAX extended header",
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "tar {what} of {size} bytes: larger than the {MAX_META_ENTRY} bytes allowed"
                ),
            ));
        }
        // The tar crate reads a local PAX header only under ustar or GNU magic.
        let recognized = &h[257..263] == b"ustar\0" && &h[263..265] == b"00"
            || &h[257..263] == b"ustar " && &h[263..265] == b" \0";
        self.pax = (typ == b'x' && recognized).then(Vec::new);
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        // GNU sparse: byte 482 says extension blocks follow the header.
        if typ == b'S' && h[482] != 0 {
            self.sparse_ext = true;
            self.sparse_ext_blocks = 0;
            self.pending_data = padded;
        } else {
            self.data_left = padded;
        }
        if padded == 0 {
            self.finish_pax();
        }
        Ok(())
    }

    /// A PAX header's data is complete: its `size` applies to the next
    /// entry. Parsed exactly as the tar crate does (records split at
    /// newlines, the first malformed record ends the search, the first
    /// `size` wins), so both see the same entry boundaries.
    fn finish_pax(&mut self) {
        let Some(data) = self.pax.take() else { return };
        self.next_size = pax_size(&data);
    }
}

fn pax_size(data: &[u8]) -> Option<u64> {
    for line in data.split(|b| *b == b'\n') {
        if line.is_empty() {
            return None;
        }
        let space = line.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let kv = &line[space + 1..];
        let eq = kv.iter().position(|b| *b == b'=')?;
        if &kv[..eq] == b"size" {
            return std::str::from_utf8(&kv[eq + 1..]).ok()?.parse().ok();
        }
    }
    None
}

/// A tar numeric field: octal text, or base-256 when the top bit is set.
fn parse_size(field: &[u8]) -> io::Result<u64> {
    if field[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(u64::from(*b)))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "tar size overflows"))?;
        }
        return Ok(n);
    }
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad tar size field"))
}

impl<R: Read> Read for HeaderLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if self.data_left > 0 {
                let take = (self.data_left.min(rest.len() as u64)) as usize;
                if let Some(p) = &mut self.pax {
                    p.extend_from_slice(&rest[..take]);
                }
                self.data_left -= take as u64;
                rest = &rest[take..];
                if self.data_left == 0 {
                    self.finish_pax();
                }
                continue;
            }
            let take = (BLOCK - self.header.len()).min(rest.len());
            self.header.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.header.len() == BLOCK {
                self.on_block()?;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8]) -> io::Result<Vec<String>> {
        let mut a = tar::Archive::new(HeaderLimit::new(data));
        let mut names = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            names.push(e.path()?.to_string_lossy().to_string());
            io::copy(&mut e, &mut io::sink())?;
        }
        Ok(names)
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    #[test]
    fn passes_ordinary_archives_with_long_names_and_pax() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/f", "d".repeat(300));
        file(&mut b, "a.txt", b"hello");
        file(&mut b, &long, &vec![7u8; 5000]);
        b.append_pax_extensions([("size", b"3".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "p.txt", b"abc".as_slice()).unwrap();
        file(&mut b, "z", b"");
        let names = read_all(&b.into_inner().unwrap()).unwrap();
        assert_eq!(
            names,
            vec!["a.txt".to_string(), long, "p.txt".into(), "z".into()]
        );
    }

    /// A PAX header (with or without ustar magic) saying `records`, then a
    /// GNU long name header claiming 300 MiB.
    fn desync_attempt(magic: bool, records: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut h = if magic {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_old()
        };
        h.set_size(records.len() as u64);
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(records.as_bytes());
        out.resize(out.len().div_ceil(512) * 512, 0);
        let mut l = tar::Header::new_gnu();
        l.set_size(300 << 20);
        l.set_entry_type(tar::EntryType::GNULongName);
        l.set_cksum();
        out.extend_from_slice(l.as_bytes());
        out.extend(vec![b'a'; 8192]);
        out
    }

    #[test]
    fn agrees_with_the_tar_crate_on_pax_sizes() {
        // No magic: the tar crate ignores the record; so must the guard.
        let e = read_all(&desync_attempt(false, "12 size=512\n")).unwrap_err();
        assert!(e.to_string().contains("GNU long name"), "{e}");
        // Two size records: the first counts for both.
        let e = read_all(&desync_attempt(true, "12 size=512\n13 size=1024\n")).unwrap_err();
        assert!(!e.to_string().is_empty());
        assert_eq!(pax_size(b"12 size=512\n13 size=1024\n"), Some(512));
        assert_eq!(pax_size(b"13 size= 512\n"), None);
        assert_eq!(pax_size(b"99 size=512\n"), None);
    }

    #[test]
    fn refuses_a_huge_long_name_before_reading_it() {
        // A header claiming a 100 MiB long name; the data need not exist.
        let mut h = tar::Header::new_gnu();
        h.set_size(100 << 20);
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend(vec![b'a'; 4096]);
        let e = read_all(&data).unwrap_err().to_string();
        assert!(e.contains("GNU long name of 104857600 bytes"), "{e}");
        let mut h = tar::Header::new_ustar();
        h.set_size(MAX_META_ENTRY + 1);
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_cksum();
        let e = read_all(h.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("PAX extended header"), "{e}");
    }

    #[test]
    fn refuses_a_sparse_entry_with_endless_extension_blocks() {
        // A GNU sparse header that says extension blocks follow, then more
        // of them than any real file has, each saying another follows.
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::GNUSparse);
        let mut block = h.as_bytes().to_vec();
        block[482] = 1;
        let mut data = block;
        let mut ext = vec![0u8; BLOCK];
        ext[504] = 1;
        for _ in 0..(MAX_SPARSE_EXT_BLOCKS as usize + 2) {
            data.extend_from_slice(&ext);
        }
        let mut guard = HeaderLimit::new(data.as_slice());
        let e = io::copy(&mut guard, &mut io::sink())
            .unwrap_err()
            .to_string();
        assert!(e.contains("extension blocks"), "{e}");
    }
}

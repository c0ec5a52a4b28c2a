//! The throughput ceiling for exporting a layer on this machine: read a
//! file, sha256 the uncompressed stream, compress it (gzip in parallel
//! members, zstd multithreaded, on all cores) and sha256 the result — the
//! same libraries and the same work kiln's export does, minus the tar and
//! the disk write. Used by bench/run.sh: `codec_limit FILE` prints
//! `gzip MB/s` and `zstd MB/s` lines.

use std::io::{Read, Write};
use std::time::Instant;

use kiln_compress::{Codec, Encoder, cores};
use sha2::{Digest, Sha256};

/// A writer that only hashes (the compressed blob's digest).
struct HashSink(Sha256);
impl Write for HashSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let path = std::env::args().nth(1).expect("usage: codec_limit FILE");
    for codec in [Codec::Gzip, Codec::Zstd] {
        let mut f = std::fs::File::open(&path)?;
        let t = Instant::now();
        let mut enc = Encoder::new(
            HashSink(Sha256::new()),
            codec,
            codec.default_level(),
            cores(),
        )?;
        let mut diff = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            diff.update(&buf[..n]);
            enc.write_all(&buf[..n])?;
            total += n as u64;
        }
        let sink = enc.finish()?;
        let _ = (diff.finalize(), sink.0.finalize());
        let secs = t.elapsed().as_secs_f64();
        println!("{} {:.0}", codec.name(), total as f64 / 1e6 / secs);
    }
    Ok(())
}

//! Layer compression on all cores. gzip is compressed in parallel blocks,
//! each a complete gzip member: RFC 1952 allows a file to be several
//! members back to back and every gzip reader (Go's, zlib's, flate2's
//! `MultiGzDecoder`) reads them as one stream. zstd uses libzstd's own
//! worker threads. Memory stays bounded: at most two blocks per thread are
//! in flight.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Uncompressed bytes per gzip member. Large enough that restarting the
/// dictionary at each member costs well under 1% of ratio.
pub const BLOCK: usize = 1 << 20;

/// Input bytes per zstd multithreaded job.
const ZSTD_JOB: u32 = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Zstd,
    Uncompressed,
}

impl Codec {
    pub fn parse(name: &str) -> Option<Codec> {
        match name {
            "gzip" => Some(Codec::Gzip),
            "zstd" => Some(Codec::Zstd),
            "uncompressed" => Some(Codec::Uncompressed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
            Codec::Uncompressed => "uncompressed",
        }
    }

    /// The level used when none is asked for (BuildKit's defaults).
    pub fn default_level(self) -> i32 {
        match self {
            Codec::Gzip => 6,
            Codec::Zstd => 3,
            Codec::Uncompressed => 0,
        }
    }

    /// The levels a codec accepts.
    pub fn check_level(self, level: i32) -> Result<i32, String> {
        let (lo, hi) = match self {
            Codec::Gzip => (0, 9),
            Codec::Zstd => (1, 22),
            Codec::Uncompressed => return Ok(0),
        };
        if (lo..=hi).contains(&level) {
            Ok(level)
        } else {
            Err(format!(
                "compression-level={level} is out of range for {} ({lo}-{hi})",
                self.name()
            ))
        }
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A compressing writer; `finish` flushes and returns the inner writer.
pub enum Encoder<W: Write> {
    Gzip(ParallelGzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Encoder<W> {
    pub fn new(inner: W, codec: Codec, level: i32, threads: usize) -> io::Result<Self> {
        Ok(match codec {
            Codec::Gzip => Encoder::Gzip(ParallelGzEncoder::new(inner, level as u32, threads)),
            Codec::Zstd => {
                let mut enc = zstd::Encoder::new(inner, level)?;
                if threads > 1 {
                    enc.multithread(threads as u32)?;
                    // libzstd's default job is 4 windows (8 MiB at level 3)
                    // with several jobs' buffers per worker: ~110 MB for one
                    // layer. 2 MiB jobs use a third of that, were as fast
                    // here, and cost 0.4% of size on a tar of /usr/lib.
                    enc.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB))?;
                }
                Encoder::Zstd(enc)
            }
            Codec::Uncompressed => Encoder::Plain(inner),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
            Encoder::Plain(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
            Encoder::Plain(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::Plain(w) => w.flush(),
        }
    }
}

type Job = (Vec<u8>, SyncSender<io::Result<Vec<u8>>>);

/// gzip compressed by a pool of threads, one member per block, written in order.
pub struct ParallelGzEncoder<W: Write> {
    inner: Option<W>,
    buf: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    pending: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_pending: usize,
    workers: Vec<JoinHandle<()>>,
    /// Input bytes seen, to emit one empty member for an empty stream.
    written: u64,
}

impl<W: Write> ParallelGzEncoder<W> {
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok((block, reply)) = job else {
                            return;
                        };
                        let _ = reply.send(gzip_member(&block, level));
                    }
                })
            })
            .collect();
        ParallelGzEncoder {
            inner: Some(inner),
            buf: Vec::with_capacity(BLOCK),
            jobs: Some(tx),
            pending: VecDeque::new(),
            max_pending: threads * 2,
            workers,
            written: 0,
        }
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        let (reply, result) = sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("encoder finished"))?
            .send((block, reply))
            .map_err(|_| io::Error::other("gzip worker threads stopped"))?;
        self.pending.push_back(result);
        while self.pending.len() >= self.max_pending {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(r) = self.pending.pop_front() {
            let member = r
                .recv()
                .map_err(|_| io::Error::other("gzip worker thread died"))??;
            self.inner
                .as_mut()
                .ok_or_else(|| io::Error::other("encoder finished"))?
                .write_all(&member)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        if !self.buf.is_empty() || self.written == 0 {
            self.dispatch()?;
        }
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let mut inner = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("encoder finished"))?;
        inner.flush()?;
        Ok(inner)
    }
}

impl<W: Write> Write for ParallelGzEncoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == BLOCK {
            self.dispatch()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzEncoder<W> {
    fn drop(&mut self) {
        // Closing the job channel stops the workers.
        self.jobs = None;
        self.pending.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One complete gzip member. Fixed header (no name, mtime 0) so equal
/// input gives equal bytes.
fn gzip_member(block: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(
        Vec::with_capacity(block.len() / 2 + 64),
        flate2::Compression::new(level),
    );
    enc.write_all(block)?;
    enc.finish()
}

/// A `Write` that hands 1 MiB chunks to a thread owning `inner`, so whatever
/// `inner` does (hashing, compressing, syscalls) runs beside the producer
/// instead of after it. At most `depth` chunks wait in between.
pub struct BackgroundWriter<W: Write + Send + 'static> {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    worker: Option<JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> BackgroundWriter<W> {
    pub fn new(mut inner: W, depth: usize) -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(depth);
        let worker = std::thread::spawn(move || {
            for chunk in rx {
                inner.write_all(&chunk)?;
            }
            Ok(inner)
        });
        BackgroundWriter {
            buf: Vec::with_capacity(BLOCK),
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk).is_ok());
        if sent != Some(true) {
            // The worker stopped: its error is the one to report.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("background writer stopped early")));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<W> {
        self.tx = None;
        match self.worker.take() {
            Some(h) => h
                .join()
                .map_err(|_| io::Error::other("background writer panicked"))?,
            None => Err(io::Error::other("background writer already finished")),
        }
    }

    /// Writes what is left, waits for the thread and returns `inner`.
    pub fn finish(mut self) -> io::Result<W> {
        self.send()?;
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for BackgroundWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BLOCK {
            self.send()?;
        }
        Ok(n)
    }
    /// Hands over the partial chunk; does not wait for the thread.
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(n: usize) -> Vec<u8> {
        // Compressible but not trivial.
        (0..n)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[test]
    fn background_writer_keeps_order_and_reports_errors() {
        let data: Vec<u8> = (0..3 * BLOCK + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut w = BackgroundWriter::new(Vec::new(), 2);
        for piece in data.chunks(70_001) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.finish().unwrap(), data);

        /// Fails once it has taken more than `left` bytes.
        struct Full {
            left: usize,
        }
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if b.len() > self.left {
                    return Err(io::Error::other("disk full"));
                }
                self.left -= b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = BackgroundWriter::new(Full { left: BLOCK }, 1);
        let r = (0..16).try_for_each(|_| w.write_all(&data[..BLOCK]));
        let err = match r {
            Err(e) => e,
            Ok(()) => w.finish().map(|_| ()).unwrap_err(),
        };
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[test]
    fn parallel_gzip_round_trips_and_is_deterministic() {
        for size in [0, 10, BLOCK - 1, BLOCK, BLOCK * 5 + 123] {
            let data = sample(size);
            let enc = |threads| {
                let mut e = ParallelGzEncoder::new(Vec::new(), 6, threads);
                for chunk in data.chunks(70_000) {
                    e.write_all(chunk).unwrap();
                }
                e.finish().unwrap()
            };
            let a = enc(4);
            // The same bytes whatever the thread count.
            assert_eq!(a, enc(1), "size {size}");
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(a.as_slice())
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data, "size {size}");
        }
    }

    #[test]
    fn encoder_codecs_and_levels() {
        let data = sample(3 * BLOCK);
        for codec in [Codec::Gzip, Codec::Zstd, Codec::Uncompressed] {
            let mut e = Encoder::new(Vec::new(), codec, codec.default_level(), 2).unwrap();
            e.write_all(&data).unwrap();
            let out = e.finish().unwrap();
            let mut back = Vec::new();
            match codec {
                Codec::Gzip => {
                    flate2::read::MultiGzDecoder::new(out.as_slice())
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Codec::Zstd => {
                    zstd::Decoder::new(out.as_slice())
                        .unwrap()
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Codec::Uncompressed => back = out,
            }
            assert_eq!(back, data, "{codec:?}");
        }
        assert!(Codec::Gzip.check_level(10).is_err());
        assert!(Codec::Zstd.check_level(19).is_ok());
        assert_eq!(Codec::parse("brotli"), None);
    }
}

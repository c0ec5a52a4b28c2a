//! The content store: blobs by digest under `blobs/sha256/<hex>`. Writes go
//! to a temp file in `ingest/`, are hashed while written, fsynced, verified
//! and renamed into place, so a crash never leaves a partial blob under a
//! digest name.
#![forbid(unsafe_code)]

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use kiln_digest::{Digest, HashingWriter};

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content store I/O at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {0} not found")]
    NotFound(Digest),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

/// Bytes written between two background flushes of a big blob.
const FLUSH_EVERY: u64 = 32 << 20;

/// An in-progress blob write.
pub struct Writer {
    inner: HashingWriter<File>,
    tmp: tempfile::TempPath,
    store: ContentStore,
    written: u64,
    flushed_at: u64,
    /// A background `fdatasync` of what was written so far: big blobs reach
    /// the disk while they are still being produced, so the fsync at commit
    /// has little left to wait for instead of a whole layer.
    flushing: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed_at >= FLUSH_EVERY
            && self.flushing.as_ref().is_none_or(|h| h.is_finished())
        {
            if let Some(h) = self.flushing.take() {
                h.join()
                    .map_err(|_| io::Error::other("background flush panicked"))??;
            }
            let file = self.inner.get_ref().try_clone()?;
            self.flushing = Some(std::thread::spawn(move || file.sync_data()));
            self.flushed_at = self.written;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Writer {
    /// Fsyncs and moves the blob into place; checks `expected` if given.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<(Digest, u64), ContentError> {
        if let Some(h) = self.flushing.take() {
            h.join()
                .map_err(|_| io_err(&self.tmp)(io::Error::other("background flush panicked")))?
                .map_err(io_err(&self.tmp))?;
        }
        let (file, digest, size) = self.inner.finish();
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        if let Some(e) = expected
            && *e != digest
        {
            return Err(ContentError::DigestMismatch {
                expected: e.clone(),
                actual: digest,
            });
        }
        let dest = self.store.path(&digest);
        if dest.exists() {
            return Ok((digest, size));
        }
        self.tmp.persist(&dest).map_err(|e| ContentError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok((digest, size))
    }
}

impl ContentStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ContentError> {
        let root = root.into();
        for d in [root.join("blobs/sha256"), root.join("ingest")] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        // Leftovers of writes interrupted by a crash.
        let ingest = root.join("ingest");
        if let Ok(entries) = fs::read_dir(&ingest) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(ContentStore { root })
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn exists(&self, d: &Digest) -> bool {
        self.path(d).exists()
    }

    pub fn size(&self, d: &Digest) -> Result<u64, ContentError> {
        let p = self.path(d);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ContentError::NotFound(d.clone())),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    pub fn writer(&self) -> Result<Writer, ContentError> {
        let dir = self.root.join("ingest");
        let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
        let (file, tmp) = tmp.into_parts();
        Ok(Writer {
            inner: HashingWriter::new(file),
            tmp,
            store: self.clone(),
            written: 0,
            flushed_at: 0,
            flushing: None,
        })
    }

    pub fn put(&self, data: &[u8]) -> Result<Digest, ContentError> {
        let d = Digest::of(data);
        if self.exists(&d) {
            return Ok(d);
        }
        let mut w = self.writer()?;
        w.write_all(data).map_err(io_err(&self.root))?;
        w.commit(Some(&d)).map(|(d, _)| d)
    }

    pub fn open_blob(&self, d: &Digest) -> Result<File, ContentError> {
        let p = self.path(d);
        File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContentError::NotFound(d.clone()),
            _ => io_err(&p)(e),
        })
    }

    pub fn read(&self, d: &Digest) -> Result<Vec<u8>, ContentError> {
        let mut buf = Vec::new();
        self.open_blob(d)?
            .read_to_end(&mut buf)
            .map_err(io_err(&self.path(d)))?;
        Ok(buf)
    }

    pub fn delete(&self, d: &Digest) -> Result<(), ContentError> {
        let p = self.path(d);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Every blob digest in the store.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, ContentError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((d, size));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_verify() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let d = cs.put(b"hello").unwrap();
        assert_eq!(cs.read(&d).unwrap(), b"hello");
        let mut w = cs.writer().unwrap();
        w.write_all(b"other").unwrap();
        let err = w.commit(Some(&d)).unwrap_err();
        assert!(matches!(err, ContentError::DigestMismatch { .. }));
        // Nothing half-written is left behind.
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
        assert_eq!(cs.list().unwrap().len(), 1);
    }

    #[test]
    fn big_blob_flushed_in_the_background_commits_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        let mut w = cs.writer().unwrap();
        let mut all = Vec::new();
        // Three background flushes' worth, written in odd pieces.
        for _ in 0..(3 * FLUSH_EVERY as usize / chunk.len() + 1) {
            w.write_all(&chunk[..chunk.len() - 7]).unwrap();
            all.extend_from_slice(&chunk[..chunk.len() - 7]);
        }
        let (d, size) = w.commit(Some(&Digest::of(&all))).unwrap();
        assert_eq!(size, all.len() as u64);
        assert_eq!(cs.read(&d).unwrap(), all);
    }
}

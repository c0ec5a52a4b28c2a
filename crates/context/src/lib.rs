//! The build context: `.dockerignore` rules, the client-side walk that
//! produces the file tree, and the daemon-side mirror that fetches only
//! changed files and computes content checksums for cache keys.
#![forbid(unsafe_code)]

pub mod dockerignore;
pub mod mirror;
pub mod walk;

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("context path {0:?} is outside the context root")]
    OutsideRoot(String),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    #[error(".dockerignore: {0}")]
    Pattern(#[from] dockerignore::PatternError),
}

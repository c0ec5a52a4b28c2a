//! The output types: files (`local`, `tar`), image archives (`oci`,
//! `docker`) and images pushed or kept in the daemon's image store
//! (`image`, `registry`), with what the image outputs share (`images`).

pub(crate) mod archive;
pub mod cache;
pub(crate) mod files;
pub(crate) mod image;
pub(crate) mod images;

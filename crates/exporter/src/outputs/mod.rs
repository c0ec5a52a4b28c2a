//! The output types: files (`local`, `tar`), image archives (`oci`,
//! `docker`) and pushed images (`image`, `registry`), with what the image
//! outputs share (`images`).

pub(crate) mod archive;
pub mod cache;
pub(crate) mod files;
pub(crate) mod images;
pub(crate) mod push;

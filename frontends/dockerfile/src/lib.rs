//! The Dockerfile frontend: parser, shell-word expansion, instruction
//! checks and conversion to kiln's build graph. Pure: it never touches
//! files or runs processes.
#![forbid(unsafe_code)]

pub mod parser;
pub mod shell;

pub use parser::{Ast, Heredoc, Node, ParseError, parse};
pub mod convert;

pub use convert::{
    ConvertOptions, Converted, FrontendError, ImageResolver, NoImages, Platform, convert,
};

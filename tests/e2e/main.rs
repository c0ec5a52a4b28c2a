//! End-to-end tests: one binary (cargo's pattern), one module per area.

mod builds;
mod cache;
mod cli;
mod containment;
mod emulation;
mod errors;
mod farm;
mod gc;
mod history;
mod images;
mod lifecycle;
mod parity;
mod progress;
mod provenance;
mod registry;
mod run;
mod sbom;
mod sign;
mod traces;

//! End-to-end tests: one binary (cargo's pattern), one module per area.

mod builds;
mod errors;
mod lifecycle;
mod registry;
mod run;

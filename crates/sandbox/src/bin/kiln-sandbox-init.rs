//! The sandbox helper as its own small binary. kilnd (and kilnctl's
//! embedded engine) re-execute themselves when it is missing; this one
//! starts in a third of the time, which is most of a trivial RUN's cost.

fn main() {
    kiln_sandbox::maybe_run();
    eprintln!("kiln-sandbox-init: started by kilnd for one build step; not for direct use");
    std::process::exit(2);
}

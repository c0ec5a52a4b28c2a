//! The parser and the converter must return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ast) = kiln_dockerfile::parse(data) {
        let _ = ast.dump();
        let _ = kiln_dockerfile::convert(data, &kiln_dockerfile::ConvertOptions::default(), &kiln_dockerfile::NoImages);
    }
});

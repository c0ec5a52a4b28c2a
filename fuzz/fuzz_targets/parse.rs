//! The parser and the converter must return errors, never panic.
#![no_main]

use kiln_dockerfile::{ConvertOptions, ImageResolver, Platform};
use libfuzzer_sys::fuzz_target;

/// Every image exists and is empty, so conversion goes past FROM.
struct AnyImage;
impl ImageResolver for AnyImage {
    fn resolve(
        &self,
        reference: &str,
        p: &Platform,
    ) -> Result<(String, kiln_definition::image::Image), String> {
        Ok((
            reference.to_string(),
            kiln_definition::image::Image::empty(&p.os, &p.architecture, &p.variant),
        ))
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ast) = kiln_dockerfile::parse(data) {
        let _ = ast.dump();
        let _ = kiln_dockerfile::convert(data, &ConvertOptions::default(), &AnyImage);
    }
});

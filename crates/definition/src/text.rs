//! Bounding text that carries user input (a Dockerfile line, a command, a
//! file name from a layer) before it goes into an error, a log line or a
//! status event: hostile input must not make a message megabytes long.

use std::borrow::Cow;

/// Errors and status messages are cut to this many bytes.
pub const MAX_MESSAGE: usize = 4096;

/// `s` cut to at most `max` bytes (on a character boundary), with a note
/// of how much was left out.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… [{} more bytes]", &s[..end], s.len() - end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_a_char_boundary_and_says_so() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(100);
        let b = bounded(&long, 11);
        assert!(b.starts_with("ééééé…"), "{b}");
        assert!(b.ends_with("[190 more bytes]"), "{b}");
    }
}

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

/// Secrets shorter than this are not masked (one or two bytes would mask
/// ordinary text everywhere).
pub const MIN_SECRET_LEN: usize = 3;

/// Overwrites every occurrence of each secret value in `data` with `*`
/// (lengths kept, so bounds hold); whether any was found. Values shorter
/// than [`MIN_SECRET_LEN`] are left alone.
pub fn mask_secrets(data: &mut [u8], secrets: &[&[u8]]) -> bool {
    let mut hit = false;
    for s in secrets.iter().filter(|s| s.len() >= MIN_SECRET_LEN) {
        let mut i = 0;
        while i + s.len() <= data.len() {
            if &data[i..i + s.len()] == *s {
                data[i..i + s.len()].fill(b'*');
                hit = true;
                i += s.len();
            } else {
                i += 1;
            }
        }
    }
    hit
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

    #[test]
    fn secrets_are_masked_in_place_and_short_ones_left() {
        let mut d = b"token=s3cr3t and s3cr3t; id=ab".to_vec();
        assert!(mask_secrets(&mut d, &[b"s3cr3t", b"ab"]));
        assert_eq!(d, b"token=****** and ******; id=ab");
        assert!(!mask_secrets(&mut d, &[b"nothing"]));
    }
}

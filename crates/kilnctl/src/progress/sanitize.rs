//! Step output made safe and readable for a progress display: escape
//! sequences (colours, cursor moves, titles) are dropped, a carriage return
//! starts the line over (a `\r` progress bar shows its last state, not one
//! line per update), other control characters go, tabs become spaces, and
//! lines are bounded.

/// A line longer than this is cut (the rest of it is dropped).
pub const MAX_LINE: usize = 4096;

/// Turns a stream of output chunks into lines.
#[derive(Debug, Default, Clone)]
pub struct LineSplitter {
    /// The line being written (after the last `\n`).
    partial: String,
    /// Inside an escape sequence: 0 none, 1 after ESC, 2 CSI, 3 OSC/DCS
    /// string, 4 after an intermediate byte.
    escape: u8,
    /// A `\r` was seen: the line starts over unless `\n` follows (CRLF).
    cr: bool,
}

impl LineSplitter {
    /// Feeds a chunk; returns the lines it completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(bytes);
        let mut done = Vec::new();
        for c in text.chars() {
            match self.escape {
                1 => {
                    self.escape = match c {
                        '[' => 2,
                        ']' | 'P' | '_' | '^' | 'X' => 3,
                        // Intermediate bytes (`ESC ( B`): the final byte follows.
                        ' '..='/' => 4,
                        _ => 0,
                    };
                    continue;
                }
                4 => {
                    if !(' '..='/').contains(&c) {
                        self.escape = 0;
                    }
                    continue;
                }
                2 => {
                    // CSI: parameters, then a final byte in @..~.
                    if ('@'..='~').contains(&c) {
                        self.escape = 0;
                    }
                    continue;
                }
                3 => {
                    // Strings end at BEL or ESC \ (the ESC starts over).
                    if c == '\u{7}' {
                        self.escape = 0;
                    } else if c == '\u{1b}' {
                        self.escape = 1;
                    }
                    continue;
                }
                _ => {}
            }
            if self.cr && c != '\n' && c != '\r' {
                self.partial.clear();
            }
            self.cr = false;
            match c {
                '\u{1b}' => self.escape = 1,
                '\n' => done.push(std::mem::take(&mut self.partial)),
                '\r' => self.cr = true,
                '\t' => self.add("    "),
                c if c.is_control() => {}
                c => {
                    let mut b = [0u8; 4];
                    self.add(c.encode_utf8(&mut b));
                }
            }
        }
        done
    }

    fn add(&mut self, s: &str) {
        if self.partial.len() + s.len() <= MAX_LINE {
            self.partial.push_str(s);
        }
    }

    /// The line being written, if any.
    pub fn partial(&self) -> Option<&str> {
        (!self.partial.is_empty()).then_some(self.partial.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carriage_returns_and_escapes() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"10%\r20%\r"), Vec::<String>::new());
        assert_eq!(s.partial(), Some("20%"));
        assert_eq!(s.push(b"100%\n"), ["100%"]);
        assert_eq!(
            s.push(b"\x1b[1;31mred\x1b[0m and \x1b]0;title\x07plain\x1b(B\n"),
            ["red and plain"]
        );
        // Split across chunks, CRLF line ends, a tab and a bell.
        assert!(s.push(b"par").is_empty());
        assert_eq!(s.partial(), Some("par"));
        assert_eq!(s.push(b"t\x07\tx\r\n"), ["part    x"]);
        let long = vec![b'x'; MAX_LINE * 2];
        assert_eq!(s.push(&long).len(), 0);
        assert_eq!(s.push(b"\n")[0].len(), MAX_LINE);
    }
}

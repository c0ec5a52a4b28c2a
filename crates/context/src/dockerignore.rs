//! `.dockerignore` files with Docker's semantics (moby/patternmatcher):
//! `*`, `?`, `[...]`, `**`, `!` re-includes, the last matching pattern wins,
//! and a pattern that matches a directory matches everything below it.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("illegal exclusion pattern: \"!\"")]
    LoneBang,
    #[error("syntax error in pattern {0:?}")]
    Syntax(String),
}

/// Reads a .dockerignore file into its pattern list.
pub fn read_patterns(data: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = if i == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        if line.starts_with('#') {
            continue;
        }
        let mut p = line.trim().to_string();
        if p.is_empty() {
            continue;
        }
        let invert = p.starts_with('!');
        if invert {
            p = p[1..].trim().to_string();
        }
        if !p.is_empty() {
            p = clean(&p);
            if p.len() > 1 && p.starts_with('/') {
                p.remove(0);
            }
        }
        if invert {
            p = format!("!{p}");
        }
        out.push(p);
    }
    out
}

/// Go's `filepath.Clean` for '/'-separated paths.
pub fn clean(p: &str) -> String {
    let abs = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !abs {
                    out.push("..");
                }
            }
            x => out.push(x),
        }
    }
    let j = out.join("/");
    match (abs, j.is_empty()) {
        (true, _) => format!("/{j}"),
        (false, true) => ".".into(),
        (false, false) => j,
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Exact,
    Prefix,
    Suffix,
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
struct Pattern {
    cleaned: String,
    exclusion: bool,
    kind: Kind,
}

impl Pattern {
    fn compile(cleaned: &str, exclusion: bool) -> Result<Pattern, PatternError> {
        let chars: Vec<char> = cleaned.chars().collect();
        let mut re = String::from("^");
        let mut kind = 0u8; // 0 exact, 1 prefix, 2 suffix, 3 regex
        let mut i = 0;
        let mut idx = 0;
        let mut in_bracket = false;
        while i < chars.len() {
            let ch = chars[i];
            i += 1;
            if ch == '*' {
                if chars.get(i) == Some(&'*') {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i >= chars.len() {
                        if kind == 0 {
                            kind = 1;
                        } else {
                            re.push_str(".*");
                            kind = 3;
                        }
                    } else {
                        re.push_str("(.*/)?");
                        kind = 3;
                    }
                    if idx == 0 {
                        kind = 2;
                    }
                } else {
                    re.push_str("[^/]*");
                    kind = 3;
                }
            } else if ch == '?' {
                re.push_str("[^/]");
                kind = 3;
            } else if ".+()|{}$".contains(ch) {
                re.push('\\');
                re.push(ch);
            } else if ch == '\\' {
                if i < chars.len() {
                    re.push_str(&regex::escape(&chars[i].to_string()));
                    i += 1;
                } else {
                    re.push_str("\\\\");
                }
                kind = 3;
            } else if ch == '[' || ch == ']' {
                in_bracket = ch == '[';
                re.push(ch);
                kind = 3;
            } else if in_bracket {
                re.push(ch);
            } else {
                re.push_str(&regex::escape(&ch.to_string()));
            }
            idx += 1;
        }
        let kind = match kind {
            0 => Kind::Exact,
            1 => Kind::Prefix,
            2 => Kind::Suffix,
            _ => {
                re.push('$');
                // Classes pass to the regex as written, as in Go's
                // patternmatcher: `[!a]` is `!` or `a`, only `[^a]` negates.
                Kind::Regex(
                    regex::Regex::new(&re)
                        .map_err(|_| PatternError::Syntax(cleaned.to_string()))?,
                )
            }
        };
        Ok(Pattern {
            cleaned: cleaned.to_string(),
            exclusion,
            kind,
        })
    }

    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.cleaned,
            Kind::Prefix => path.starts_with(&self.cleaned[..self.cleaned.len() - 2]),
            Kind::Suffix => {
                let suffix = &self.cleaned[2..];
                path.ends_with(suffix) || (suffix.starts_with('/') && path == &suffix[1..])
            }
            Kind::Regex(re) => re.is_match(path),
        }
    }
}

/// Checks bracket syntax the way Go's `filepath.Match` rejects bad patterns.
fn check_syntax(p: &str) -> Result<(), PatternError> {
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '[' => {
                i += 1;
                if matches!(chars.get(i), Some('^' | '!')) {
                    i += 1;
                }
                let start = i;
                loop {
                    match chars.get(i) {
                        None => return Err(PatternError::Syntax(p.to_string())),
                        Some(']') if i > start => break,
                        Some(']') => return Err(PatternError::Syntax(p.to_string())),
                        Some('\\') => i += 2,
                        Some('-') if i == start => return Err(PatternError::Syntax(p.to_string())),
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct Matcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl Matcher {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        let mut m = Matcher::default();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                continue;
            }
            let p = clean(p);
            let (exclusion, body) = match p.strip_prefix('!') {
                Some("") => return Err(PatternError::LoneBang),
                Some(rest) => (true, rest.to_string()),
                None => (false, p.clone()),
            };
            check_syntax(&body)?;
            m.exclusions |= exclusion;
            m.patterns.push(Pattern::compile(&body, exclusion)?);
        }
        Ok(m)
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether some pattern re-includes paths (`!`): then an ignored
    /// directory must still be walked.
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// Whether an ignored directory must still be walked because an
    /// exception could re-include something below it. As BuildKit's fsutil
    /// walker: only when an exception pattern's text starts with the
    /// directory's path (`!d/keep` reaches into `d`, `!**/keep` does not).
    pub fn may_reinclude_under(&self, dir: &str) -> bool {
        let dir_slash = format!("{dir}/");
        self.patterns
            .iter()
            .any(|p| p.exclusion && format!("{}/", p.cleaned).starts_with(&dir_slash))
    }

    /// Whether `path` (relative, '/'-separated) is ignored, by itself or
    /// through one of its parent directories.
    pub fn matches(&self, path: &str) -> bool {
        let mut matched = false;
        let parent = match path.rfind('/') {
            Some(i) => &path[..i],
            None => ".",
        };
        let parent_dirs: Vec<&str> = parent.split('/').collect();
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut m = p.matches(path);
            if !m && parent != "." {
                for i in 0..parent_dirs.len() {
                    if p.matches(&parent_dirs[..=i].join("/")) {
                        m = true;
                        break;
                    }
                }
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basics() {
        let m = Matcher::new(&read_patterns(b"*.md\n!README.md\nbuild/**\n/tmp\n")).unwrap();
        assert!(m.matches("x.md"));
        assert!(!m.matches("README.md"));
        assert!(m.matches("build/a/b"));
        assert!(m.matches("tmp/x"));
        assert!(!m.matches("src/x.md"));
        assert!(Matcher::new(&["!"]).is_err());
        assert!(Matcher::new(&["[a-"]).is_err());
    }

    #[test]
    fn classes_and_reinclusion_follow_buildkit() {
        let m = Matcher::new(&["[!a]*"]).unwrap();
        assert!(m.matches("a.log") && m.matches("!x") && !m.matches("b.log"));
        let m = Matcher::new(&["[^a]*"]).unwrap();
        assert!(!m.matches("a.log") && m.matches("b.log"));
        // An excluded directory is walked only when an exception names a
        // path below it literally.
        let m = Matcher::new(&["*", "!**/keep.txt", "!d/e/keep.txt"]).unwrap();
        assert!(m.may_reinclude_under("d") && m.may_reinclude_under("d/e"));
        assert!(!m.may_reinclude_under("x") && !m.may_reinclude_under("d/f"));
    }
}

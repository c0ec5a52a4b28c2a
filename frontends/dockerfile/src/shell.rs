//! Shell-word expansion with BuildKit's rules (`$v`, `${v:-w}`, `${v#p}`,
//! `${v/p/r}`, quotes and escapes). This is not a shell: it only expands
//! variables and removes quotes, for instructions the builder itself reads.

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "failed to process {:?}: {message}",
    kiln_definition::text::bounded(source_text, 200)
)]
pub struct ShellError {
    pub source_text: String,
    pub message: String,
}

/// Variable lookup used by the lexer.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

impl Env for [(String, String)] {
    fn get(&self, name: &str) -> Option<String> {
        // The last definition wins, like a shell environment.
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

impl<T: Env + ?Sized> Env for std::sync::Arc<T> {
    fn get(&self, name: &str) -> Option<String> {
        (**self).get(name)
    }
}

impl Env for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<String> {
        Env::get(self.as_slice(), name)
    }
}

/// An environment with nothing set.
pub struct EmptyEnv;
impl Env for EmptyEnv {
    fn get(&self, _: &str) -> Option<String> {
        None
    }
}

/// Lexer configuration.
#[derive(Debug, Clone, Copy)]
pub struct Lex {
    pub escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset_env: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
}

/// The outcome of expanding one word.
#[derive(Debug, Default, Clone)]
pub struct Expansion {
    pub result: String,
    pub words: Vec<String>,
    /// Names looked up and found (set, maybe empty).
    pub matched: BTreeSet<String>,
    /// Names looked up and not set.
    pub unmatched: BTreeSet<String>,
}

impl Lex {
    pub fn new(escape: char) -> Self {
        Lex {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset_env: false,
            skip_process_quotes: false,
        }
    }

    /// Expands `word` to a single string.
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        self.process(word, env).map(|e| e.result)
    }

    /// Expands `word` and splits the result into words as a shell would.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        self.process(word, env).map(|e| e.words)
    }

    pub fn process(&self, word: &str, env: &dyn Env) -> Result<Expansion, ShellError> {
        let mut sw = ShellWord {
            chars: word.chars().collect(),
            pos: 0,
            env,
            lex: *self,
            raw_escapes: self.raw_escapes,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
            depth: 0,
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((result, words)) => Ok(Expansion {
                result,
                words,
                matched: sw.matched,
                unmatched: sw.unmatched,
            }),
            Err(message) => Err(ShellError {
                source_text: word.to_string(),
                message,
            }),
        }
    }
}

struct ShellWord<'a> {
    chars: Vec<char>,
    pos: usize,
    env: &'a dyn Env,
    lex: Lex,
    raw_escapes: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
    /// `${` nesting so far: expansion recurses once per level.
    depth: usize,
}

/// Deepest `${a:-${b:-...}}` nesting expanded: the Dockerfile decides the
/// depth of the recursion, so it is bounded (real files nest two or three).
pub const MAX_EXPANSION_DEPTH: usize = 64;

/// Longest word an expansion may produce. `ENV A=$A$A$A` doubles a value
/// per line and `${A//?/$A}` squares it: unbounded, one Dockerfile could
/// take the daemon's memory. Linux refuses any one argument or variable
/// over 128 KiB at exec anyway.
pub const MAX_EXPANDED_WORD: usize = 1 << 20;

fn check_len(len: usize) -> Res<()> {
    if len > MAX_EXPANDED_WORD {
        return Err(format!(
            "the expansion is longer than {} MiB",
            MAX_EXPANDED_WORD >> 20
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }
    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }
    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

type Res<T> = Result<T, String>;

impl ShellWord<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Res<(String, Vec<String>)> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        r
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> Res<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let quotes = !self.lex.skip_process_quotes;
            if ch == '$' {
                let tmp = self.process_dollar()?;
                check_len(result.len() + tmp.len())?;
                result.push_str(&tmp);
                words.add_string(&tmp);
            } else if quotes && ch == '\'' {
                let tmp = self.process_single_quote()?;
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
            } else if quotes && ch == '"' {
                let tmp = self.process_double_quote()?;
                check_len(result.len() + tmp.len())?;
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
            } else {
                let mut ch = self.next().unwrap_or_default();
                if ch == self.lex.escape {
                    if self.raw_escapes {
                        words.add_raw_char(ch);
                        result.push(ch);
                    }
                    match self.next() {
                        None => break,
                        Some(c) => ch = c,
                    }
                    words.add_raw_char(ch);
                } else {
                    words.add_char(ch);
                }
                result.push(ch);
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Res<String> {
        let mut result = String::new();
        let open = self.next().unwrap_or('\'');
        if self.lex.raw_quotes {
            result.push(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Res<String> {
        let mut result = String::new();
        let open = self.next().unwrap_or('"');
        if self.lex.raw_quotes {
            result.push(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    check_len(result.len() + v.len())?;
                    result.push_str(&v);
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        match self.peek() {
                            // A lone escape at the end of the word is dropped.
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                                if self.raw_escapes {
                                    result.push(ch);
                                }
                                ch = self.next().unwrap_or_default();
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        match self.env.get(name) {
            Some(v) => {
                self.matched.insert(name.to_string());
                Some(v)
            }
            None => {
                self.unmatched.insert(name.to_string());
                None
            }
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_ascii_digit() {
                while let Some(c) = self.peek() {
                    if !c.is_ascii_digit() {
                        break;
                    }
                    name.push(c);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !ch.is_alphanumeric() && ch != '_' {
                break;
            }
            name.push(ch);
            self.next();
        }
        name
    }

    fn process_dollar(&mut self) -> Res<String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        if self.depth >= MAX_EXPANSION_DEPTH {
            return Err(format!(
                "variable substitutions nested more than {MAX_EXPANSION_DEPTH} deep"
            ));
        }
        self.depth += 1;
        let r = self.process_braced();
        self.depth -= 1;
        r
    }

    /// `${...}` after the brace.
    fn process_braced(&mut self) -> Res<String> {
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            _ => {}
        }
        let name = self.process_name();
        let ch = self.next();
        let mut chs: String = ch.map(String::from).unwrap_or_default();
        match ch {
            Some('}') => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            Some(c @ (':' | '+' | '-' | '?' | '#' | '%')) => {
                let mut modifier = c;
                let null_is_unset = c == ':';
                if null_is_unset {
                    let n = self.next();
                    if let Some(n) = n {
                        chs.push(n);
                    }
                    modifier = n.unwrap_or('\0');
                }
                let raw = modifier == '#' || modifier == '%';
                if null_is_unset && raw {
                    return Err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = match self.process_stop_on(Some('}'), raw) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err("syntax error: missing '}'".into());
                        }
                        return Err(e);
                    }
                };
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let empty = value
                    .as_deref()
                    .is_none_or(|v| null_is_unset && v.is_empty());
                match modifier {
                    '-' => Ok(if empty {
                        word
                    } else {
                        value.unwrap_or_default()
                    }),
                    '+' => Ok(if empty { String::new() } else { word }),
                    '?' => match value {
                        None => Err(format!(
                            "{name}: {}",
                            if word.is_empty() {
                                "is not allowed to be unset"
                            } else {
                                &word
                            }
                        )),
                        Some(v) if null_is_unset && v.is_empty() => Err(format!(
                            "{name}: {}",
                            if word.is_empty() {
                                "is not allowed to be empty"
                            } else {
                                &word
                            }
                        )),
                        Some(v) => Ok(v),
                    },
                    '%' | '#' => {
                        let (greedy, pattern) = match word.strip_prefix(modifier) {
                            Some(rest) => (true, rest.to_string()),
                            None => (false, word),
                        };
                        let value = value.unwrap_or_default();
                        if modifier == '%' {
                            trim_suffix(&pattern, &value, greedy)
                        } else {
                            trim_prefix(&pattern, &value, greedy)
                        }
                    }
                    _ => Err(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            Some('/') => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.next();
                }
                let pattern = match self.process_stop_on(Some('/'), true) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err("syntax error: missing '/' in ${}".into());
                        }
                        return Err(e);
                    }
                };
                let replacement = match self.process_stop_on(Some('}'), true) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err("syntax error: missing '}'".into());
                        }
                        return Err(e);
                    }
                };
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let re = shell_pattern_regex(&pattern, true, false)
                    .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
                if replace_all {
                    // What the replacements would add, before making it.
                    let matches = re.find_iter(&value).count();
                    check_len(
                        value
                            .len()
                            .saturating_add(matches.saturating_mul(replacement.len())),
                    )?;
                    Ok(re
                        .replace_all(&value, regex::NoExpand(&replacement))
                        .into_owned())
                } else if let Some(m) = re.find(&value) {
                    Ok(format!(
                        "{}{}{}",
                        &value[..m.start()],
                        replacement,
                        &value[m.end()..]
                    ))
                } else {
                    Ok(value)
                }
            }
            _ => Err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }
}

/// Converts a shell glob (`*`, `?`, `\` escapes) to a regex.
fn shell_pattern_regex(
    pattern: &str,
    greedy: bool,
    anchored: bool,
) -> Result<regex::Regex, String> {
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let star = if greedy { ".*" } else { ".*?" };
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let tok = chars[i];
        i += 1;
        match tok {
            '*' => {
                out.push_str(star);
                continue;
            }
            '?' => {
                out.push('.');
                continue;
            }
            '\\' => {
                // `}` and `/` are escaped only to get through `${}` parsing.
                if matches!(chars.get(i), Some('}' | '/')) {
                    continue;
                }
                let Some(&next) = chars.get(i) else {
                    return Err("invalid escape at end of pattern".into());
                };
                i += 1;
                if !matches!(next, '*' | '?' | '\\') {
                    return Err(format!("invalid escape '\\{next}'"));
                }
                out.push('\\');
                out.push(next);
                continue;
            }
            _ => {}
        }
        out.push_str(&regex::escape(&tok.to_string()));
    }
    // (?s) so `*` also spans newlines, like a shell glob.
    regex::Regex::new(&format!("(?s){out}")).map_err(|e| e.to_string())
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Res<String> {
    let re = shell_pattern_regex(pattern, greedy, true)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

/// Reverses a pattern, keeping each escape in front of the character it escapes.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut units: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' && i + 1 < chars.len() {
            units.push(format!("\\{}", chars[i + 1]));
            i += 2;
        } else {
            units.push(chars[i].to_string());
            i += 1;
        }
    }
    units.reverse();
    units.concat()
}

fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Res<String> {
    // The shortest rightmost match is the shortest leftmost match of the
    // reversed pattern in the reversed value.
    let rev: String = value.chars().rev().collect();
    let out = trim_prefix(&reverse_pattern(pattern), &rev, greedy)?;
    Ok(out.chars().rev().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn basics() {
        let l = Lex::new('\\');
        let e = env(&[("a", "x y"), ("e", "")]);
        assert_eq!(l.process_word("$a-${a}", &e).unwrap(), "x y-x y");
        assert_eq!(l.process_word("${e:-d}${e-d}", &e).unwrap(), "d");
        assert_eq!(
            l.process_words("$a 'b c'", &e).unwrap(),
            vec!["x", "y", "b c"]
        );
        assert!(l.process_word("${a:=x}", &e).is_err());
        assert_eq!(l.process_word("${a#* }", &e).unwrap(), "y");
        assert_eq!(l.process_word("${a/ /_}", &e).unwrap(), "x_y");
    }
}

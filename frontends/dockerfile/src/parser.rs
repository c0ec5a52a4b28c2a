//! Dockerfile parser: directives, logical lines, flags, per-instruction
//! argument rules and heredocs, following BuildKit's parser so that every
//! Dockerfile BuildKit accepts parses the same way here.

use crate::shell::{EmptyEnv, Lex};

/// Longest physical line accepted (BuildKit's scanner limit).
const MAX_LINE: usize = 65535;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", location(*start_line, *end_line))]
pub struct ParseError {
    pub message: String,
    /// 1-based; 0 when the error is not tied to a line.
    pub start_line: usize,
    pub end_line: usize,
}

fn location(start: usize, end: usize) -> String {
    if end > start {
        format!("line {start}-{end}")
    } else {
        format!("line {start}")
    }
}

/// A heredoc body attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    pub name: String,
    pub content: String,
    pub file_descriptor: u32,
    pub expand: bool,
    pub chomp: bool,
}

/// One instruction as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// Lower-cased keyword.
    pub keyword: String,
    /// The joined logical line as written (after continuation handling).
    pub original: String,
    pub flags: Vec<String>,
    pub args: Vec<String>,
    /// `HEALTHCHECK`: the first token kept apart from the command.
    pub json: bool,
    /// ONBUILD's nested instruction.
    pub sub: Option<Box<Node>>,
    pub heredocs: Vec<Heredoc>,
    /// 1-based inclusive line range.
    pub start_line: usize,
    pub end_line: usize,
    /// Comment lines directly above the instruction.
    pub comments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub short: String,
    pub detail: String,
    pub start_line: usize,
    pub end_line: usize,
}

/// Parser directives found at the top of the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub escape: Option<char>,
    pub syntax: Option<String>,
    pub check: Option<String>,
    pub syntax_line: usize,
    pub check_line: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Ast {
    pub children: Vec<Node>,
    pub directives: Directives,
    pub warnings: Vec<Warning>,
    pub escape: char,
    pub start_line: usize,
    pub end_line: usize,
}

struct DirectiveParser {
    done: bool,
    escape: char,
    directives: Directives,
}

impl DirectiveParser {
    /// Looks at one (left-trimmed) physical line for a parser directive.
    fn line(&mut self, line: &str, lineno: usize) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        let Some((name, value)) = parse_directive(line) else {
            self.done = true;
            return Ok(());
        };
        let key = name.to_lowercase();
        let slot_seen = match key.as_str() {
            "escape" => self.directives.escape.is_some(),
            "syntax" => self.directives.syntax.is_some(),
            "check" => self.directives.check.is_some(),
            _ => {
                self.done = true;
                return Ok(());
            }
        };
        if slot_seen {
            return Err(format!("only one {key} parser directive can be used"));
        }
        match key.as_str() {
            "escape" => {
                let c = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ => {
                        return Err(format!(
                            "invalid escape token '{value}' does not match ` or \\"
                        ));
                    }
                };
                self.escape = c;
                self.directives.escape = Some(c);
            }
            "syntax" => {
                self.directives.syntax = Some(value);
                self.directives.syntax_line = lineno;
            }
            _ => {
                self.directives.check = Some(value);
                self.directives.check_line = lineno;
            }
        }
        Ok(())
    }
}

/// `#\s*name\s*=\s*value\s*` with name = `[a-zA-Z][a-zA-Z0-9]*`.
fn parse_directive(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix('#')?;
    let rest = rest.trim_start();
    let name_len = rest
        .char_indices()
        .take_while(|(i, c)| {
            if *i == 0 {
                c.is_ascii_alphabetic()
            } else {
                c.is_ascii_alphanumeric()
            }
        })
        .count();
    if name_len == 0 {
        return None;
    }
    let name = &rest[..name_len];
    let rest = rest[name_len..].trim_start().strip_prefix('=')?;
    let value = rest.trim();
    if value.is_empty() {
        return None;
    }
    Some((name.to_string(), value.to_string()))
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

/// Removes a trailing escape (and the blanks after it); returns whether the
/// logical line ends here.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    if let Some(before) = trimmed.strip_suffix(escape) {
        // `EE` at the end is an escaped escape, not a continuation.
        match before.chars().last() {
            None => return (String::new(), false),
            Some(c) if c != escape => return (before.to_string(), false),
            _ => {}
        }
    }
    (line.to_string(), true)
}

/// Splits on runs of `[\t\v\f\r ]`.
pub(crate) fn split_ws(s: &str) -> Vec<String> {
    s.split(['\t', '\u{0b}', '\u{0c}', '\r', ' '])
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn split_ws_once(s: &str) -> (&str, Option<&str>) {
    match s.find(['\t', '\u{0b}', '\u{0c}', '\r', ' ']) {
        Some(i) => {
            let rest = s[i..].trim_start_matches(['\t', '\u{0b}', '\u{0c}', '\r', ' ']);
            (&s[..i], Some(rest))
        }
        None => (s, None),
    }
}

/// Parses a whole Dockerfile.
pub fn parse(input: &[u8]) -> Result<Ast, ParseError> {
    let text = String::from_utf8_lossy(input);
    let mut raw_lines: Vec<&str> = text.split('\n').collect();
    // `split` yields one empty piece after a final newline; a scanner does not.
    if raw_lines.last() == Some(&"") {
        raw_lines.pop();
    }
    if let Some(first) = raw_lines.first_mut() {
        *first = first.strip_prefix('\u{feff}').unwrap_or(first);
    }
    for (i, l) in raw_lines.iter().enumerate() {
        if l.len() > MAX_LINE {
            return Err(ParseError {
                message: format!("dockerfile line greater than max allowed size of {MAX_LINE}"),
                start_line: i + 1,
                end_line: i + 1,
            });
        }
    }

    let mut dp = DirectiveParser {
        done: false,
        escape: '\\',
        directives: Directives::default(),
    };
    let mut ast = Ast {
        escape: '\\',
        ..Default::default()
    };
    let mut comments: Vec<String> = Vec::new();
    let mut idx = 0usize; // index of the next physical line
    let err = |message: String, start: usize, end: usize| ParseError {
        message,
        start_line: start,
        end_line: end,
    };

    while idx < raw_lines.len() {
        let raw = raw_lines[idx];
        if is_comment(raw) {
            let c = raw.trim_start()[1..].trim();
            if c.is_empty() {
                comments.clear();
            } else {
                comments.push(c.to_string());
            }
        }
        let line = trim_newline(raw).trim_start();
        dp.line(line, idx + 1)
            .map_err(|m| err(m, idx + 1, idx + 1))?;
        let line = if is_comment(line) { "" } else { line };
        idx += 1;
        let start_line = idx;
        let escape = dp.escape;
        let (mut joined, mut eol) = trim_continuation(line, escape);
        if eol && joined.is_empty() {
            continue;
        }
        let mut empty_continuation = false;
        while !eol && idx < raw_lines.len() {
            let raw = raw_lines[idx];
            let l = trim_newline(raw);
            dp.line(l, idx + 1).map_err(|m| err(m, idx + 1, idx + 1))?;
            idx += 1;
            if is_comment(raw) {
                continue;
            }
            if l.trim_start().is_empty() {
                empty_continuation = true;
                continue;
            }
            let (part, e) = trim_continuation(l, escape);
            joined.push_str(&part);
            eol = e;
        }
        let end_line = idx;
        if empty_continuation {
            ast.warnings.push(Warning {
                short: format!("Empty continuation line found in: {}", joined.trim()),
                detail: "Empty continuation lines will become errors in a future release".into(),
                start_line,
                end_line,
            });
        }
        let mut node = node_from_line(&joined, escape).map_err(|m| err(m, start_line, end_line))?;
        node.comments = std::mem::take(&mut comments);

        let heredoc_target = match &node.sub {
            Some(sub) if node.keyword == "onbuild" => sub.as_ref(),
            _ => &node,
        };
        if can_contain_heredoc(heredoc_target) && joined.contains("<<") {
            let docs = heredocs_from_line(&joined).map_err(|m| err(m, start_line, idx))?;
            let mut bodies = Vec::new();
            for mut doc in docs {
                let mut terminated = false;
                while idx < raw_lines.len() {
                    let raw = raw_lines[idx];
                    idx += 1;
                    let mut candidate = trim_newline(raw);
                    if doc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                    doc.content.push('\n');
                }
                if !terminated {
                    return Err(err("unterminated heredoc".into(), start_line, idx));
                }
                bodies.push(doc);
            }
            match node.sub.as_mut() {
                Some(sub) if node.keyword == "onbuild" => sub.heredocs = bodies,
                _ => node.heredocs = bodies,
            }
        }
        node.start_line = start_line;
        node.end_line = idx;
        if ast.children.is_empty() {
            ast.start_line = start_line;
        }
        ast.end_line = idx;
        ast.children.push(node);
    }
    ast.escape = dp.escape;
    ast.directives = dp.directives;
    if ast.children.is_empty() {
        return Err(err("file with no instructions".into(), idx, 0));
    }
    Ok(ast)
}

fn can_contain_heredoc(node: &Node) -> bool {
    matches!(node.keyword.as_str(), "run" | "copy" | "add") && !node.json
}

/// `ONBUILD ONBUILD ...` nesting the parser accepts (building refuses any
/// chaining, as BuildKit does); each level copies the rest of the line.
const MAX_ONBUILD_NESTING: usize = 8;

/// Builds one instruction node from a joined logical line.
pub(crate) fn node_from_line(line: &str, escape: char) -> Result<Node, String> {
    node_at_depth(line, escape, 0)
}

fn node_at_depth(line: &str, escape: char, depth: usize) -> Result<Node, String> {
    let trimmed = line.trim();
    let (cmd, rest) = split_ws_once(trimmed);
    let keyword = cmd.to_lowercase();
    let (rest, flags) = match rest {
        Some(r) => extract_flags(r, escape),
        None => (String::new(), Vec::new()),
    };
    let rest = rest.trim().to_string();
    let mut node = Node {
        keyword: keyword.clone(),
        original: line.to_string(),
        flags,
        ..Default::default()
    };
    match keyword.as_str() {
        "from" | "expose" => node.args = split_ws(&rest),
        "add" | "copy" | "volume" => match parse_json(&rest) {
            JsonResult::Array(a) => {
                node.args = a;
                node.json = true;
            }
            JsonResult::NotStrings => return Err(NOT_STRING_ARRAY.into()),
            JsonResult::NotJson => node.args = split_ws(&rest),
        },
        "run" | "cmd" | "entrypoint" | "shell" => {
            let (args, json) = parse_maybe_json(&rest)?;
            node.args = args;
            node.json = json;
        }
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !rest.is_empty() {
                node.args = vec![rest];
            }
        }
        "arg" => node.args = parse_words(&rest, escape),
        "env" | "label" => node.args = parse_name_val(&rest, &keyword, escape)?,
        "healthcheck" => {
            let (typ, after) = match rest.find(char::is_whitespace) {
                Some(i) => (&rest[..i], rest[i..].trim_start()),
                None => (rest.as_str(), ""),
            };
            if !typ.is_empty() {
                let (args, json) = parse_maybe_json(after)?;
                node.args = std::iter::once(typ.to_string()).chain(args).collect();
                node.json = json;
            }
        }
        "onbuild" => {
            if depth >= MAX_ONBUILD_NESTING {
                return Err(format!(
                    "ONBUILD nested more than {MAX_ONBUILD_NESTING} deep"
                ));
            }
            if !rest.is_empty() {
                node.sub = Some(Box::new(node_at_depth(&rest, escape, depth + 1)?));
            }
        }
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

enum JsonResult {
    Array(Vec<String>),
    NotStrings,
    NotJson,
}

fn parse_json(rest: &str) -> JsonResult {
    let t = rest.trim_start();
    if !t.starts_with('[') {
        return JsonResult::NotJson;
    }
    // Like Go's json.Decoder (BuildKit's parseJSON): the first value is
    // read and text after it is ignored (`CMD ["a"] extra` is `["a"]`).
    let first = serde_json::Deserializer::from_str(t)
        .into_iter::<Vec<serde_json::Value>>()
        .next();
    match first.unwrap_or_else(|| Err(serde::de::Error::custom("empty"))) {
        Ok(vals) => {
            let mut out = Vec::with_capacity(vals.len());
            for v in vals {
                match v {
                    serde_json::Value::String(s) => out.push(s),
                    _ => return JsonResult::NotStrings,
                }
            }
            JsonResult::Array(out)
        }
        Err(_) => JsonResult::NotJson,
    }
}

/// JSON array if it is one, else the whole text as one argument.
fn parse_maybe_json(rest: &str) -> Result<(Vec<String>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json(rest) {
        JsonResult::Array(a) => Ok((a, true)),
        JsonResult::NotStrings => Err(NOT_STRING_ARRAY.into()),
        JsonResult::NotJson => Ok((vec![rest.to_string()], false)),
    }
}

/// Leading `--flag` words; returns the rest of the line and the flags.
fn extract_flags(line: &str, escape: char) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut i = 0;
    loop {
        let end = i >= chars.len();
        let ch = if end { '\0' } else { chars[i].1 };
        if phase == Phase::Spaces {
            if end {
                break;
            }
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            let next_dash = chars.get(i + 1).map(|c| c.1) == Some('-');
            if ch != '-' || !next_dash {
                return (line[chars[i].0..].to_string(), words);
            }
            phase = Phase::Word;
        }
        if end {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if word == "--" {
                    return (line[chars[i].0..].to_string(), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                i += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                i += 1;
                continue;
            }
            let mut c = ch;
            if ch == escape {
                if i + 1 == chars.len() {
                    i += 1;
                    continue;
                }
                i += 1;
                c = chars[i].1;
            }
            word.push(c);
            i += 1;
            continue;
        }
        // In a quote.
        if ch == quote {
            phase = Phase::Word;
            i += 1;
            continue;
        }
        let mut c = ch;
        if ch == escape {
            if i + 1 == chars.len() {
                phase = Phase::Word;
                i += 1;
                continue;
            }
            i += 1;
            c = chars[i].1;
        }
        word.push(c);
        i += 1;
    }
    (String::new(), words)
}

/// Splits ARG/ENV/LABEL text into words, keeping quotes and escapes.
pub fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut i = 0;
    loop {
        let end = i >= chars.len();
        let mut ch = if end { '\0' } else { chars[i] };
        if phase == Phase::Spaces {
            if end {
                break;
            }
            if ch.is_whitespace() {
                i += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if end {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                i += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if i + 1 == chars.len() {
                    i += 1;
                    continue;
                }
                word.push(ch);
                i += 1;
                ch = chars[i];
            }
            word.push(ch);
            i += 1;
            continue;
        }
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if i + 1 == chars.len() {
                phase = Phase::Word;
                i += 1;
                continue;
            }
            word.push(ch);
            i += 1;
            ch = chars[i];
        }
        word.push(ch);
        i += 1;
    }
    words
}

/// ENV/LABEL: key/value/separator triples flattened.
fn parse_name_val(rest: &str, keyword: &str, escape: char) -> Result<Vec<String>, String> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        let (k, v) = split_ws_once(rest);
        return match v {
            Some(v) => Ok(vec![k.to_string(), v.to_string(), String::new()]),
            None => Err(format!(
                "{} must have two arguments",
                keyword.to_uppercase()
            )),
        };
    }
    let mut out = Vec::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {w:?}. Must be of the form: name=value"
            ));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

/// Heredoc starts found in an instruction line, in order.
pub fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let lex = Lex {
        raw_quotes: true,
        raw_escapes: true,
        skip_unset_env: true,
        ..Lex::new('\\')
    };
    let words = lex.process_words(line, &EmptyEnv).unwrap_or_default();
    let mut docs = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        // `<< EOF` lexes as two words; the operator alone names nothing.
        let operator = w.trim_start_matches(|c: char| c.is_ascii_digit());
        if (operator == "<<" || operator == "<<-") && i < words.len() {
            if let Some(d) = parse_heredoc(&format!("{w} {}", words[i]))? {
                docs.push(d);
                i += 1;
            }
            continue;
        }
        if let Some(d) = parse_heredoc(w)? {
            docs.push(d);
        }
    }
    Ok(docs)
}

/// `^(\d*)<<(-?)\s*([^<]*)$`
pub fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, String> {
    let digits = src.bytes().take_while(u8::is_ascii_digit).count();
    let Some(after) = src[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, after) = match after.strip_prefix('-') {
        Some(a) => (true, a),
        None => (false, after),
    };
    let rest = after.trim_start();
    if rest.contains('<') || rest.is_empty() {
        return Ok(None);
    }
    let fd = src[..digits].parse::<u32>().unwrap_or(0);
    let lex = Lex {
        skip_unset_env: true,
        ..Lex::new('\\')
    };
    let words = lex
        .process_words(rest, &EmptyEnv)
        .map_err(|e| e.to_string())?;
    if words.len() != 1 {
        return Ok(None);
    }
    let raw = Lex {
        raw_quotes: true,
        ..lex
    }
    .process_words(rest, &EmptyEnv)
    .map_err(|e| e.to_string())?;
    if raw.len() != words.len() {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    }
    let quotes = |s: &str| s.matches(['\'', '"']).count();
    Ok(Some(Heredoc {
        expand: quotes(&words[0]) == quotes(&raw[0]),
        name: words[0].clone(),
        content: String::new(),
        file_descriptor: fd,
        chomp,
    }))
}

/// Go's `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c == ' ' || is_go_printable(c) => out.push(c),
            c if (c as u32) > 0xffff => out.push_str(&format!("\\U{:08x}", c as u32)),
            c => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Approximates Go's `strconv.IsPrint`: visible characters, not controls,
/// separators (other than ASCII space) or format characters.
fn is_go_printable(c: char) -> bool {
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    // Format characters (Cf) and private/unassigned ranges Go treats as non-printable.
    !matches!(u,
        0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e | 0x200b..=0x200f
        | 0x202a..=0x202e | 0x2060..=0x206f | 0xfeff | 0xfff9..=0xfffb
        | 0xe000..=0xf8ff | 0xd800..=0xdfff | 0xfffe | 0xffff)
}

impl Node {
    /// BuildKit's parser dump of one instruction (without the parentheses).
    pub fn dump(&self) -> String {
        let mut s = self.keyword.clone();
        if !self.flags.is_empty() {
            let fl: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(&format!(" [{}]", fl.join(" ")));
        }
        if let Some(sub) = &self.sub {
            s.push_str(&format!(" ({})", sub.dump()));
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(&go_quote(a));
        }
        s.trim().to_string()
    }
}

impl Ast {
    /// The whole-file dump, as in BuildKit's `result` files (without the final newline).
    pub fn dump(&self) -> String {
        let lines: Vec<String> = self
            .children
            .iter()
            .map(|c| format!("({})", c.dump()))
            .collect();
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onbuild_nesting_is_bounded() {
        let two = parse(b"FROM a\nONBUILD ONBUILD RUN x\n").unwrap();
        assert!(two.children[1].sub.as_ref().unwrap().sub.is_some());
        // 20,000 levels through continuations: an error, not gigabytes.
        let deep = format!("FROM a\n{}RUN x\n", "ONBUILD \\\n".repeat(20_000));
        let e = parse(deep.as_bytes()).unwrap_err();
        assert!(
            e.message.contains("nested more than 8 deep"),
            "{}",
            e.message
        );
    }

    #[test]
    fn simple_dump() {
        let ast = parse(b"FROM a\nRUN echo hi \\\n  there\nENV a=b c=\"d e\"\n").unwrap();
        assert_eq!(
            ast.dump(),
            "(from \"a\")\n(run \"echo hi   there\")\n(env \"a\" \"b\" \"=\" \"c\" \"\\\"d e\\\"\" \"=\")"
        );
    }

    #[test]
    fn heredoc_body_and_lines() {
        let ast = parse(b"FROM a\nRUN <<EOF\necho hi\nEOF\nUSER x\n").unwrap();
        assert_eq!(ast.children[1].heredocs[0].content, "echo hi\n");
        assert_eq!(
            (ast.children[1].start_line, ast.children[1].end_line),
            (2, 4)
        );
        assert_eq!(ast.children[2].keyword, "user");
    }

    #[test]
    fn unterminated_heredoc_is_error() {
        let e = parse(b"FROM a\nRUN <<EOF\necho hi\n").unwrap_err();
        assert!(e.message.contains("unterminated heredoc"));
    }
}

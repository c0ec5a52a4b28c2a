//! Error snippets and "did you mean" suggestions.

/// The offending line, and a caret under `token` when it appears there:
///
/// ```text
///     2 | COPY --chmoud=755 a /b
///       |      ^^^^^^^^
/// ```
pub(super) fn snippet(line: usize, text: &str, token: Option<&str>) -> String {
    if text.is_empty() {
        return String::new();
    }
    // A window of a long line, around the token when there is one.
    let token = token.filter(|t| !t.is_empty() && t.len() <= SNIPPET_WIDTH);
    let at = token.and_then(|t| text.find(t)).unwrap_or(0);
    let mut start = at.saturating_sub(SNIPPET_WIDTH / 4);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + SNIPPET_WIDTH).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let (pre, post) = (
        if start > 0 { "…" } else { "" },
        if end < text.len() { "…" } else { "" },
    );
    let shown = format!("{pre}{}{post}", &text[start..end]);
    let mut out = format!("\n {line:>4} | {shown}");
    if let Some(col) = token.and_then(|t| {
        shown
            .find(t)
            .map(|at| (shown[..at].chars().count(), t.chars().count()))
    }) {
        let (start, len) = col;
        out.push_str(&format!(
            "\n {:>4} | {}{}",
            "",
            " ".repeat(start),
            "^".repeat(len)
        ));
    }
    out
}

/// Characters of the offending line shown in an error.
pub(super) const SNIPPET_WIDTH: usize = 200;

/// ` (did you mean X?)` when one of `known` is within two edits of `word`.
pub(super) fn did_you_mean<'a>(word: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let word = word.to_lowercase();
    known
        .into_iter()
        .map(|k| (levenshtein(&word, &k.to_lowercase()), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean {k}?)"))
        .unwrap_or_default()
}

pub(super) fn suggest(word: &str) -> String {
    let best = INSTRUCTIONS
        .iter()
        .map(|i| (levenshtein(word, i), i))
        .min()
        .filter(|(d, _)| *d <= 2);
    match best {
        Some((_, i)) => format!(" (did you mean {}?)", i.to_uppercase()),
        None => String::new(),
    }
}

pub(super) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(super) const INSTRUCTIONS: [&str; 18] = [
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

//! Instruction flags (`--from=...`).

use super::*;

/// Parsed `--flag=value` options of one instruction.
#[derive(Default)]
pub(super) struct Flags(Vec<(String, String)>);

impl Flags {
    pub(super) fn get(&self, k: &str) -> Option<&String> {
        self.0.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v)
    }
    pub(super) fn all<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.0.iter().filter(move |(n, _)| n == k).map(|(_, v)| v)
    }
}

/// Err carries the flag as written and the message.
pub(super) fn parse_flags(raw: &[String], allowed: &[&str]) -> Result<Flags, (String, String)> {
    let mut out = Flags::default();
    for f in raw {
        let body = f.trim_start_matches("--");
        let (k, v) = match body.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (body.to_string(), "true".to_string()),
        };
        if !allowed.contains(&k.as_str()) {
            let hint = did_you_mean(&k, allowed.iter().copied());
            let hint = hint.replace("mean ", "mean --");
            return Err((format!("--{k}"), format!("unknown flag: --{k}{hint}")));
        }
        // Only the list flags may repeat (BuildKit's BFlags).
        if !matches!(k.as_str(), "mount" | "exclude") && out.0.iter().any(|(n, _)| *n == k) {
            return Err((format!("--{k}"), format!("Duplicate flag specified: --{k}")));
        }
        out.0.push((k, v));
    }
    Ok(out)
}

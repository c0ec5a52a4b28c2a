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

/// The flags an instruction accepts.
pub(super) fn allowed_flags(keyword: &str) -> &'static [&'static str] {
    match keyword {
        "copy" => &["from", "chown", "chmod", "link", "parents", "exclude"],
        "add" => &[
            "chown",
            "chmod",
            "link",
            "checksum",
            "keep-git-dir",
            "exclude",
            "unpack",
        ],
        "run" => &["mount", "network", "security"],
        "healthcheck" => &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
        "from" => &["platform"],
        _ => &[],
    }
}

/// Docker's image reference grammar (distribution/reference): a lower-case
/// repository path, an optional domain, tag and digest.
pub(super) fn valid_image_reference(r: &str) -> bool {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        let comp = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
        let domain = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?";
        let pattern = format!(
            r"^(?:{domain}/)?{comp}(?:/{comp})*(?::[\w][\w.-]{{0,127}})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}})?$"
        );
        regex::Regex::new(&pattern).expect("reference grammar")
    });
    // The first component is a domain only when it looks like one.
    let first = r.split('/').next().unwrap_or("");
    let domain_like = first.contains(['.', ':']) || first == "localhost";
    let upper_path =
        r.contains('/') && !domain_like && first.chars().any(|c| c.is_ascii_uppercase());
    r.len() <= 255 + 140 && re.is_match(r) && !upper_path
}

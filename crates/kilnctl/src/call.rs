//! `--call targets|outline`: what a Dockerfile offers, read without
//! building (buildx's subrequests). `--call check` is `--check`.

use std::fmt::Write as _;

use anyhow::bail;

/// A comment's description of `name`: the first comment line, without a
/// leading `name ` (the `# NAME description` convention BuildKit reads).
fn description(comments: &[String], name: &str) -> String {
    let Some(first) = comments.first() else {
        return String::new();
    };
    let text = first.trim_start_matches('#').trim();
    text.strip_prefix(name)
        .filter(|rest| rest.starts_with(' '))
        .map(str::trim)
        .unwrap_or(text)
        .to_string()
}

/// `--call targets`: every named stage with its description; the default
/// (last) stage marked.
pub fn targets(dockerfile: &[u8]) -> anyhow::Result<String> {
    let ast = kiln_dockerfile::parse(dockerfile).map_err(|e| anyhow::anyhow!("{e}"))?;
    let froms: Vec<&kiln_dockerfile::Node> = ast
        .children
        .iter()
        .filter(|n| n.keyword == "from")
        .collect();
    let mut rows = Vec::new();
    for (i, n) in froms.iter().enumerate() {
        let name = match n.args.as_slice() {
            [_, kw, name] if kw.eq_ignore_ascii_case("as") => name.to_lowercase(),
            _ => continue,
        };
        let shown = if i + 1 == froms.len() {
            format!("{name} (default)")
        } else {
            name.clone()
        };
        rows.push((shown, description(&n.comments, &name)));
    }
    if rows.is_empty() {
        bail!("the Dockerfile names no stages (FROM ... AS NAME)");
    }
    Ok(table(&["TARGET", "DESCRIPTION"], &rows))
}

/// `--call outline`: the build arguments the target reads (global ones and
/// its own stage's), with defaults and descriptions.
pub fn outline(dockerfile: &[u8], target: Option<&str>) -> anyhow::Result<String> {
    let ast = kiln_dockerfile::parse(dockerfile).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Split into the global part and the stages.
    let mut global = Vec::new();
    let mut stages: Vec<(
        Option<String>,
        &kiln_dockerfile::Node,
        Vec<&kiln_dockerfile::Node>,
    )> = Vec::new();
    for n in &ast.children {
        if n.keyword == "from" {
            let name = match n.args.as_slice() {
                [_, kw, name] if kw.eq_ignore_ascii_case("as") => Some(name.to_lowercase()),
                _ => None,
            };
            stages.push((name, n, Vec::new()));
        } else if let Some(last) = stages.last_mut() {
            last.2.push(n);
        } else {
            global.push(n);
        }
    }
    let chosen = match target {
        Some(t) => stages
            .iter()
            .find(|s| s.0.as_deref() == Some(&t.to_lowercase()))
            .ok_or_else(|| anyhow::anyhow!("target stage {t:?} could not be found"))?,
        None => stages
            .last()
            .ok_or_else(|| anyhow::anyhow!("the Dockerfile has no FROM"))?,
    };
    let mut out = String::new();
    let name = chosen
        .0
        .clone()
        .unwrap_or_else(|| "(unnamed last stage)".into());
    let _ = writeln!(out, "TARGET:      {name}");
    let desc = description(&chosen.1.comments, &name);
    if !desc.is_empty() {
        let _ = writeln!(out, "DESCRIPTION: {desc}");
    }
    let mut rows = Vec::new();
    for n in global
        .iter()
        .chain(chosen.2.iter())
        .filter(|n| n.keyword == "arg")
    {
        for a in &n.args {
            let (k, v) = a.split_once('=').unwrap_or((a, ""));
            if rows
                .iter()
                .any(|(r, _, _): &(String, String, String)| r == k)
            {
                continue;
            }
            rows.push((k.to_string(), v.to_string(), description(&n.comments, k)));
        }
    }
    if !rows.is_empty() {
        out.push('\n');
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(9);
        let vwidth = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
        let _ = writeln!(
            out,
            "{:<width$}   {:<vwidth$}   DESCRIPTION",
            "BUILD ARG", "VALUE"
        );
        for (k, v, d) in rows {
            let _ = writeln!(out, "{k:<width$}   {v:<vwidth$}   {d}");
        }
    }
    Ok(out)
}

fn table(header: &[&str; 2], rows: &[(String, String)]) -> String {
    let width = rows
        .iter()
        .map(|r| r.0.len())
        .chain([header[0].len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:<width$}   {}\n", header[0], header[1]);
    for (a, b) in rows {
        let _ = writeln!(out, "{a:<width$}   {b}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DF: &[u8] = b"# GO_VERSION the Go toolchain\nARG GO_VERSION=1.22\n# base the toolchain\nFROM scratch AS base\nFROM base AS build\n# VERSION what to stamp\nARG VERSION=dev\n# release the shipped image\nFROM scratch AS release\n";

    #[test]
    fn targets_and_outline_as_buildx_prints_them() {
        let t = targets(DF).unwrap();
        assert!(t.starts_with("TARGET"), "{t}");
        assert!(t.contains("base                the toolchain"), "{t}");
        assert!(t.contains("release (default)   the shipped image"), "{t}");
        let o = outline(DF, Some("build")).unwrap();
        assert!(o.contains("TARGET:      build"), "{o}");
        assert!(o.contains("GO_VERSION   1.22    the Go toolchain"), "{o}");
        assert!(o.contains("VERSION      dev     what to stamp"), "{o}");
        assert!(outline(DF, Some("nope")).is_err());
    }
}

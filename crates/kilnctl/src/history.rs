//! `kilnctl history ls|inspect|logs|rm`: the daemon's record of builds, as
//! `docker buildx history` shows it.

use std::fmt::Write as _;

use kiln_proto::control as ctl;

fn status_word(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `1.2s`, `3m4s`: how long a build took (running: so far).
fn duration(r: &ctl::BuildHistoryRecord, now_ns: i64) -> String {
    let end = if r.completed > 0 { r.completed } else { now_ns };
    let ms = (end - r.started).max(0) / 1_000_000;
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn rfc3339(ns: i64) -> String {
    kiln_definition::time::rfc3339(ns / 1_000_000_000)
}

/// One JSON object per record, every field (times RFC 3339).
fn json(r: &ctl::BuildHistoryRecord) -> serde_json::Value {
    let response: serde_json::Map<String, serde_json::Value> = r
        .exporter_response
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "ref": r.r#ref, "name": r.name, "context": r.context,
        "dockerfile": r.dockerfile, "target": r.target, "platforms": r.platforms,
        "outputs": r.outputs, "status": r.status, "error": r.error,
        "createdAt": rfc3339(r.started),
        "completedAt": if r.completed > 0 { serde_json::json!(rfc3339(r.completed)) } else { serde_json::Value::Null },
        "durationMs": if r.completed > 0 { serde_json::json!((r.completed - r.started) / 1_000_000) } else { serde_json::Value::Null },
        "numTotalSteps": r.steps_total, "numCachedSteps": r.steps_cached,
        "exporterResponse": response,
        "logBytes": r.log_bytes, "logsTruncated": r.logs_truncated,
    })
}

/// `history ls`: BUILD ID, NAME, STATUS, CREATED AT, DURATION, as buildx.
pub fn render_ls(records: &[ctl::BuildHistoryRecord], format: &str, now_ns: i64) -> String {
    if format == "json" {
        let list: Vec<_> = records.iter().map(json).collect();
        return format!("{}\n", serde_json::Value::Array(list));
    }
    let mut out = format!(
        "{:<34} {:<24} {:<12} {:<22} {}\n",
        "BUILD ID", "NAME", "STATUS", "CREATED AT", "DURATION"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<34} {:<24} {:<12} {:<22} {}",
            r.r#ref,
            r.name,
            status_word(&r.status),
            rfc3339(r.started),
            duration(r, now_ns)
        );
    }
    out
}

/// `history inspect`: the record as labelled lines, then the provenance
/// the build attached, if any.
pub fn render_inspect(r: &ctl::BuildHistoryRecord, format: &str, now_ns: i64) -> String {
    if format == "json" {
        return format!("{:#}\n", json(r));
    }
    let mut out = String::new();
    let mut line = |k: &str, v: &str| {
        if !v.is_empty() {
            let _ = writeln!(out, "{:<16}{v}", format!("{k}:"));
        }
    };
    line("Ref", &r.r#ref);
    line("Name", &r.name);
    line("Context", &r.context);
    line("Dockerfile", &r.dockerfile);
    line("Target", &r.target);
    line("Platforms", &r.platforms.join(", "));
    line("Status", &status_word(&r.status));
    line("Created", &rfc3339(r.started));
    if r.completed > 0 {
        line("Completed", &rfc3339(r.completed));
    }
    line("Duration", &duration(r, now_ns));
    if r.steps_total > 0 {
        line(
            "Build Steps",
            &format!(
                "{}/{} ({}% cached)",
                r.steps_total,
                r.steps_total,
                r.steps_cached * 100 / r.steps_total
            ),
        );
    }
    for o in &r.outputs {
        line("Output", o);
    }
    let get = |k: &str| r.exporter_response.get(k).cloned().unwrap_or_default();
    line("Image Name", &get("image.name"));
    line("Image Digest", &get("containerimage.digest"));
    line("Error", &r.error);
    if r.logs_truncated {
        line("Logs", "cut at 4 MiB");
    }
    let mut provenance: Vec<_> = r
        .exporter_response
        .iter()
        .filter(|(k, _)| k.starts_with("buildx.build.provenance"))
        .collect();
    provenance.sort();
    for (k, v) in provenance {
        let platform = k.strip_prefix("buildx.build.provenance/").unwrap_or("");
        let pretty = serde_json::from_str::<serde_json::Value>(v)
            .map(|j| format!("{j:#}"))
            .unwrap_or_else(|_| v.clone());
        let _ = writeln!(
            out,
            "\nProvenance{}:\n{pretty}",
            if platform.is_empty() {
                String::new()
            } else {
                format!(" ({platform})")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ctl::BuildHistoryRecord {
        ctl::BuildHistoryRecord {
            r#ref: "abc123".into(),
            name: "app".into(),
            context: "host:/src/app".into(),
            dockerfile: "Dockerfile".into(),
            platforms: vec!["linux/amd64".into()],
            status: "failed".into(),
            error: "Dockerfile:3: RUN false: exit code 1".into(),
            started: 1_700_000_000_000_000_000,
            completed: 1_700_000_001_500_000_000,
            steps_total: 4,
            steps_cached: 3,
            exporter_response: [(
                "buildx.build.provenance".to_string(),
                r#"{"buildType":"x"}"#.to_string(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn ls_and_inspect_show_what_buildx_shows() {
        let r = record();
        let ls = render_ls(std::slice::from_ref(&r), "table", 0);
        let row = ls.lines().nth(1).unwrap();
        assert!(row.starts_with("abc123"), "{ls}");
        assert!(row.contains("Failed") && row.ends_with("1.5s"), "{ls}");
        let i = render_inspect(&r, "table", 0);
        assert!(i.contains("Build Steps:    4/4 (75% cached)"), "{i}");
        assert!(i.contains("Error:          Dockerfile:3: RUN false"), "{i}");
        assert!(
            i.contains("Provenance:\n{\n  \"buildType\": \"x\"\n}"),
            "{i}"
        );
        let j: serde_json::Value = serde_json::from_str(&render_inspect(&r, "json", 0)).unwrap();
        assert_eq!(j["durationMs"], 1500);
        assert_eq!(j["numCachedSteps"], 3);
    }
}

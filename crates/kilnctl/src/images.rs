//! `kilnctl images`, `rmi`, `tag` and `push`: the daemon's image store.

use kiln_proto::control as ctl;

use crate::cache_cmds::human;

/// "3 minutes ago", as `docker images` says it.
fn ago(created: i64, now: i64) -> String {
    let s = (now - created).max(0);
    let (n, unit) = match s {
        0..60 => return "Less than a minute ago".into(),
        60..3600 => (s / 60, "minute"),
        3600..86400 => (s / 3600, "hour"),
        86400..2_592_000 => (s / 86400, "day"),
        _ => (s / 2_592_000, "month"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// The table (or JSON, or digests alone) `kilnctl images` prints.
pub fn render(images: &[ctl::ImageRecord], format: &str, quiet: bool, now: i64) -> String {
    if quiet {
        return images.iter().map(|i| format!("{}\n", i.digest)).collect();
    }
    if format == "json" {
        let list: Vec<_> = images
            .iter()
            .map(|i| {
                serde_json::json!({
                    "name": i.name, "digest": i.digest, "mediaType": i.media_type,
                    "platforms": i.platforms, "size": i.size,
                    "created": kiln_definition::time::rfc3339(i.created_at),
                })
            })
            .collect();
        return format!("{}\n", serde_json::Value::Array(list));
    }
    let mut out = format!(
        "{:<45} {:<19} {:<27} {:>10}  {}\n",
        "NAME", "DIGEST", "PLATFORMS", "SIZE", "CREATED"
    );
    for i in images {
        let short = i.digest.strip_prefix("sha256:").unwrap_or(&i.digest);
        out.push_str(&format!(
            "{:<45} {:<19} {:<27} {:>10}  {}\n",
            i.name,
            format!("sha256:{}", &short[..short.len().min(12)]),
            i.platforms.join(","),
            human(i.size),
            ago(i.created_at, now)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_name_short_digest_platforms_size_and_age() {
        let img = ctl::ImageRecord {
            name: "docker.io/library/app:latest".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            size: 2 * 1024 * 1024,
            created_at: 1000,
            platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
        };
        let t = render(std::slice::from_ref(&img), "table", false, 1000 + 180);
        let row = t.lines().nth(1).unwrap();
        assert!(row.starts_with("docker.io/library/app:latest"), "{t}");
        assert!(row.contains("sha256:abababababab "), "{t}");
        assert!(row.contains("linux/amd64,linux/arm64"), "{t}");
        assert!(row.contains("3 minutes ago"), "{t}");
        let j: serde_json::Value =
            serde_json::from_str(&render(std::slice::from_ref(&img), "json", false, 0)).unwrap();
        assert_eq!(j[0]["size"], 2 * 1024 * 1024);
        assert_eq!(
            render(std::slice::from_ref(&img), "table", true, 0).trim(),
            img.digest
        );
        assert_eq!(ago(0, 7200), "2 hours ago");
    }
}

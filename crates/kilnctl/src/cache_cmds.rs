//! `kilnctl du` and `kilnctl prune`: what they print and ask.

use anyhow::Context;
use kiln_proto::control as ctl;

/// The prune request from the command line's sizes and durations.
pub fn prune_request(
    all: bool,
    keep_storage: Option<String>,
    keep_duration: Option<String>,
    filters: Vec<String>,
) -> anyhow::Result<ctl::PruneRequest> {
    Ok(ctl::PruneRequest {
        all,
        keep_storage: keep_storage
            .map(|s| parse_size(&s))
            .transpose()?
            .unwrap_or(0),
        keep_duration: keep_duration
            .map(|s| parse_duration(&s))
            .transpose()?
            .unwrap_or(0),
        filters,
    })
}

/// What a prune removed, and the total.
pub fn print_removed(removed: &[ctl::UsageRecord]) {
    let total: i64 = removed.iter().map(|r| r.size).sum();
    for r in removed {
        println!(
            "{:<70} {:>10}",
            format!("{} {}", r.kind, r.id),
            human(r.size)
        );
    }
    println!("Total:\t{}", human(total));
}

fn print_du_json(records: &[ctl::UsageRecord]) {
    let sum = |f: &dyn Fn(&ctl::UsageRecord) -> bool| -> i64 {
        records.iter().filter(|r| f(r)).map(|r| r.size).sum()
    };
    let list: Vec<_> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.id, "type": r.kind, "description": r.description,
                "size": r.size, "created_at": r.created_at,
                "last_used_at": r.last_used_at, "usage_count": r.usage_count,
                "in_use": r.in_use, "shared": r.shared,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "records": list,
            "total": sum(&|_| true),
            "reclaimable": sum(&|r| !r.in_use),
            "shared": sum(&|r| r.shared),
        })
    );
}

pub fn human(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2}kB", n / 1e3)
    } else {
        format!("{n}B")
    }
}

/// Asks on the terminal, as buildx does; anything but y/yes (or no
/// answer at all) keeps the cache.
pub fn confirm_prune(all: bool) -> anyhow::Result<bool> {
    eprint!(
        "WARNING! This will remove {}build cache. Are you sure you want to continue? [y/N] ",
        if all { "all " } else { "all dangling " }
    );
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    let yes = matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes");
    if !yes {
        eprintln!("Nothing removed (use -f to prune without asking).");
    }
    Ok(yes)
}

/// `3 hours ago`, as buildx shows times.
fn ago(at: i64, now: i64) -> String {
    if at <= 0 {
        return "-".into();
    }
    let d = (now - at).max(0);
    let (n, unit) = match d {
        0..60 => return "Less than a minute ago".into(),
        60..3600 => (d / 60, "minute"),
        3600..86_400 => (d / 3600, "hour"),
        86_400..2_592_000 => (d / 86_400, "day"),
        _ => (d / 2_592_000, "month"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// `kilnctl du`: a table (or blocks with `verbose`), or JSON with sizes in bytes.
pub fn print_du(records: &[ctl::UsageRecord], verbose: bool, json: bool) {
    if json {
        print_du_json(records);
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let total: i64 = records.iter().map(|r| r.size).sum();
    let reclaimable: i64 = records.iter().filter(|r| !r.in_use).map(|r| r.size).sum();
    let shared: i64 = records.iter().filter(|r| r.shared).map(|r| r.size).sum();
    if verbose {
        for r in records {
            println!(
                "ID:\t\t{}\nType:\t\t{}\nDescription:\t{}\nSize:\t\t{}\nCreated at:\t{}\nLast used:\t{}\nUsage count:\t{}\nReclaimable:\t{}\nShared:\t\t{}\n",
                r.id,
                r.kind,
                r.description,
                human(r.size),
                ago(r.created_at, now),
                ago(r.last_used_at, now),
                r.usage_count,
                !r.in_use,
                r.shared
            );
        }
    } else {
        println!(
            "{:<16} {:<16} {:>11} {:>10} {:<24} DESCRIPTION",
            "ID", "TYPE", "RECLAIMABLE", "SIZE", "LAST ACCESSED"
        );
        for r in records {
            let id: String =
                r.id.trim_start_matches("sha256:")
                    .chars()
                    .take(16)
                    .collect();
            let mark = if r.shared { "*" } else { "" };
            println!(
                "{:<16} {:<16} {:>11} {:>10} {:<24} {}",
                format!("{id}{mark}"),
                r.kind,
                !r.in_use,
                human(r.size),
                ago(r.last_used_at, now),
                r.description.chars().take(60).collect::<String>()
            );
        }
    }
    println!("Shared:\t\t{}", human(shared));
    println!("Reclaimable:\t{}", human(reclaimable));
    println!("Total:\t\t{}", human(total));
}

fn parse_size(s: &str) -> anyhow::Result<i64> {
    let l = s.trim().to_lowercase();
    let units: [(&str, f64); 8] = [
        ("gib", 1073741824.0),
        ("mib", 1048576.0),
        ("kib", 1024.0),
        ("gb", 1e9),
        ("mb", 1e6),
        ("kb", 1e3),
        ("g", 1e9),
        ("m", 1e6),
    ];
    for (u, m) in units {
        if let Some(n) = l.strip_suffix(u) {
            let v: f64 = n
                .trim()
                .parse()
                .with_context(|| format!("invalid size {s:?}"))?;
            return Ok((v * m) as i64);
        }
    }
    let n = l.strip_suffix('b').unwrap_or(&l);
    n.trim()
        .parse::<i64>()
        .with_context(|| format!("invalid size {s:?} (e.g. 10GB, 512MB)"))
}

fn parse_duration(s: &str) -> anyhow::Result<i64> {
    let l = s.trim();
    let (n, mult) = if let Some(n) = l.strip_suffix('h') {
        (n, 3600)
    } else if let Some(n) = l.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = l.strip_suffix('s') {
        (n, 1)
    } else if let Some(n) = l.strip_suffix('d') {
        (n, 86400)
    } else {
        (l, 1)
    };
    let v: i64 = n
        .parse()
        .with_context(|| format!("invalid duration {s:?} (e.g. 24h, 30m)"))?;
    Ok(v * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_times() {
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(ago(1000, 1030), "Less than a minute ago");
        assert_eq!(ago(0, 1030), "-");
        assert_eq!(ago(1000, 1000 + 7200), "2 hours ago");
        assert_eq!(ago(1000, 1000 + 86_400), "1 day ago");
    }
}

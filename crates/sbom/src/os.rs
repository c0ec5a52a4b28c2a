//! Operating system package databases: dpkg's status file(s), apk's
//! installed database, and os-release (which names the distribution in
//! package URLs). All are line-based key/value records; the readers keep
//! only what an SBOM says.

use crate::{Ecosystem, Package};

/// The distribution an image says it is (`ID`, `VERSION_ID`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Distro {
    pub id: String,
    pub version_id: String,
    pub pretty_name: String,
}

pub fn parse_os_release(text: &str) -> Distro {
    let mut d = Distro::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => d.id = v,
            "VERSION_ID" => d.version_id = v,
            "PRETTY_NAME" => d.pretty_name = v,
            _ => {}
        }
    }
    d
}

/// RFC 822-style paragraphs (dpkg) of `Key: value` lines, continuation
/// lines starting with a space.
fn paragraphs(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut()
                && v.len() < 4096
            {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// dpkg's status: every package whose status says it is installed.
pub fn parse_dpkg_status(text: &str, found_at: &str) -> Vec<Package> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    let mut out = Vec::new();
    for p in paragraphs(text) {
        // One file gives at most what a whole scan keeps.
        if out.len() >= crate::MAX_PACKAGES {
            break;
        }
        let get = |k: &str| {
            p.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        let (Some(name), Some(version)) = (get("Package"), get("Version")) else {
            continue;
        };
        // Distroless status.d files have no Status line: present means installed.
        if let Some(status) = get("Status")
            && !status.ends_with(" installed")
        {
            continue;
        }
        // `Source: name (version)` when the source version differs.
        let source = get("Source").map(|s| s.split_whitespace().next().unwrap_or(s).to_string());
        out.push(Package {
            ecosystem: Ecosystem::Deb,
            name: name.to_string(),
            version: version.to_string(),
            arch: get("Architecture").map(str::to_string),
            source_package: source,
            license: None,
            supplier: get("Maintainer").map(str::to_string),
            homepage: get("Homepage").map(str::to_string),
            description: get("Description").map(|d| d.lines().next().unwrap_or("").to_string()),
            found_at: found_at.clone(),
        });
    }
    out
}

/// apk's installed database: paragraphs of one-letter keys.
pub fn parse_apk_installed(text: &str, found_at: &str) -> Vec<Package> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    let mut out = Vec::new();
    let mut fields: Vec<(char, String)> = Vec::new();
    let mut flush = |fields: &mut Vec<(char, String)>| {
        let get = |k: char| {
            fields
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        };
        if let (Some(name), Some(version)) = (get('P'), get('V')) {
            out.push(Package {
                ecosystem: Ecosystem::Apk,
                name,
                version,
                arch: get('A'),
                source_package: get('o'),
                license: get('L'),
                supplier: get('m'),
                homepage: get('U'),
                description: get('T'),
                found_at: found_at.clone(),
            });
        }
        fields.clear();
    };
    let mut entries = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            // One file gives at most what a whole scan keeps.
            entries += 1;
            if entries > crate::MAX_PACKAGES {
                break;
            }
            flush(&mut fields);
            continue;
        }
        let mut chars = line.chars();
        if let (Some(k), Some(':')) = (chars.next(), chars.next()) {
            // Only the package's own keys; file lists (F:, R:, Z:) are many.
            if "PVAoLmUT".contains(k) {
                fields.push((k, chars.as_str().to_string()));
            }
        }
    }
    flush(&mut fields);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_keeps_installed_packages_only() {
        let status = "Package: bash\nStatus: install ok installed\nPriority: required\nArchitecture: amd64\nSource: bash (5.2.15-2)\nVersion: 5.2.15-2+b2\nMaintainer: Matthias Klose <doko@debian.org>\nDescription: GNU Bourne Again SHell\n Bash is an sh-compatible command language interpreter.\nHomepage: http://tiswww.case.edu/php/chet/bash/bashtop.html\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\nPackage: distroless\nVersion: 2.0\nArchitecture: all\n";
        let pkgs = parse_dpkg_status(status, "/var/lib/dpkg/status");
        assert_eq!(pkgs.len(), 2);
        assert_eq!(pkgs[0].name, "bash");
        assert_eq!(pkgs[0].version, "5.2.15-2+b2");
        assert_eq!(pkgs[0].source_package.as_deref(), Some("bash"));
        assert_eq!(
            pkgs[0].description.as_deref(),
            Some("GNU Bourne Again SHell")
        );
        assert_eq!(pkgs[1].name, "distroless");
    }

    #[test]
    fn apk_reads_its_one_letter_keys() {
        let db = "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nL:MIT\no:musl\nm:Timo <timo@alpinelinux.org>\nU:https://musl.libc.org/\nT:the musl c library\nF:lib\nR:libc.musl-x86_64.so.1\n\nP:busybox\nV:1.36.1-r5\nA:x86_64\nL:GPL-2.0-only\n";
        let pkgs = parse_apk_installed(db, "/lib/apk/db/installed");
        assert_eq!(pkgs.len(), 2);
        assert_eq!(pkgs[0].name, "musl");
        assert_eq!(pkgs[0].license.as_deref(), Some("MIT"));
        assert_eq!(pkgs[1].version, "1.36.1-r5");
    }

    #[test]
    fn os_release_names_the_distribution() {
        let d = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
        );
        assert_eq!((d.id.as_str(), d.version_id.as_str()), ("debian", "12"));
    }
}

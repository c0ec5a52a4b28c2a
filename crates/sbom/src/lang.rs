//! Language package lockfiles found anywhere in the filesystem: Cargo.lock,
//! package-lock.json, requirements*.txt, poetry.lock and go.sum.

use std::collections::BTreeSet;
use std::str::FromStr;

use serde_json::Value;

use crate::{Ecosystem, Package};

fn package(
    ecosystem: Ecosystem,
    name: &str,
    version: &str,
    found_at: &std::sync::Arc<str>,
) -> Package {
    Package::new(ecosystem, name, version, found_at)
}

/// Every package of a Cargo.lock (any lockfile version), read by RustSec's
/// reader.
pub fn parse_cargo_lock(text: &str, found_at: &str) -> Result<Vec<Package>, String> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    let lock = cargo_lock::Lockfile::from_str(text).map_err(|e| e.to_string())?;
    Ok(lock
        .packages
        .iter()
        .map(|p| {
            let mut pkg = package(
                Ecosystem::Cargo,
                p.name.as_str(),
                &p.version.to_string(),
                found_at,
            );
            pkg.homepage = p.source.as_ref().map(|s| s.url().to_string());
            pkg
        })
        .collect())
}

/// npm's package-lock.json: `packages` (lockfile v2/v3, keyed by install
/// path) or the nested `dependencies` of v1.
pub fn parse_npm_lock(text: &str, found_at: &str) -> Result<Vec<Package>, String> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    // serde_json bounds nesting (128 levels), so a hostile file cannot
    // exhaust the stack.
    let doc: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if let Some(packages) = doc.get("packages").and_then(Value::as_object) {
        for (path, entry) in packages {
            if path.is_empty() || entry.get("link").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    path.rsplit_once("node_modules/")
                        .map(|(_, n)| n)
                        .unwrap_or(path)
                        .to_string()
                });
            let Some(version) = entry.get("version").and_then(Value::as_str) else {
                continue;
            };
            let mut p = package(Ecosystem::Npm, &name, version, found_at);
            p.license = entry
                .get("license")
                .and_then(Value::as_str)
                .map(str::to_string);
            p.homepage = entry
                .get("resolved")
                .and_then(Value::as_str)
                .map(str::to_string);
            out.push(p);
        }
        return Ok(out);
    }
    // v1: dependencies nest; walk them with a stack of our own.
    let mut stack: Vec<&serde_json::Map<String, Value>> = Vec::new();
    if let Some(d) = doc.get("dependencies").and_then(Value::as_object) {
        stack.push(d);
    }
    while let Some(deps) = stack.pop() {
        for (name, entry) in deps {
            if let Some(version) = entry.get("version").and_then(Value::as_str) {
                let mut p = package(Ecosystem::Npm, name, version, found_at);
                p.homepage = entry
                    .get("resolved")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                out.push(p);
            }
            if let Some(d) = entry.get("dependencies").and_then(Value::as_object) {
                stack.push(d);
            }
        }
    }
    Ok(out)
}

/// requirements*.txt: the pinned requirements (`name==version`); options,
/// includes, URLs and unpinned ranges name no version to report.
pub fn parse_requirements(text: &str, found_at: &str) -> Vec<Package> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    let mut out = Vec::new();
    for raw in text.lines() {
        // One file gives at most what a whole scan keeps.
        if out.len() >= crate::MAX_PACKAGES {
            break;
        }
        let line = match raw.find(" #") {
            Some(i) => &raw[..i],
            None => raw,
        };
        let line = line.trim().trim_end_matches('\\').trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('-') {
            continue;
        }
        // Environment markers and per-requirement options come after ';' or ' --'.
        let spec = line.split(';').next().unwrap_or(line);
        let spec = spec.split(" --").next().unwrap_or(spec).trim();
        let Some((name, version)) = spec.split_once("===").or_else(|| spec.split_once("==")) else {
            continue;
        };
        let name = name.split('[').next().unwrap_or(name).trim();
        let version = version.split(',').next().unwrap_or(version).trim();
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-+!*".contains(c))
        };
        if valid(name) && valid(version) && !version.contains('*') {
            out.push(package(Ecosystem::PyPI, name, version, found_at));
        }
    }
    out
}

/// poetry.lock: its `[[package]]` tables.
pub fn parse_poetry_lock(text: &str, found_at: &str) -> Result<Vec<Package>, String> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    #[derive(serde::Deserialize)]
    struct Lock {
        #[serde(default)]
        package: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        name: String,
        version: String,
        description: Option<String>,
    }
    let lock: Lock = toml::from_str(text).map_err(|e| e.message().to_string())?;
    Ok(lock
        .package
        .into_iter()
        .map(|e| {
            let mut p = package(Ecosystem::PyPI, &e.name, &e.version, found_at);
            p.description = e.description.filter(|d| !d.is_empty());
            p
        })
        .collect())
}

/// go.sum: the modules whose content (not only go.mod) the build hashed.
pub fn parse_go_sum(text: &str, found_at: &str) -> Vec<Package> {
    let found_at: &std::sync::Arc<str> = &found_at.into();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        // One file gives at most what a whole scan keeps.
        if out.len() >= crate::MAX_PACKAGES {
            break;
        }
        let mut words = line.split_whitespace();
        let (Some(module), Some(version), Some(_hash)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if version.ends_with("/go.mod") {
            continue;
        }
        if seen.insert((module, version)) {
            out.push(package(Ecosystem::Go, module, version, found_at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_lock_v3() {
        let lock = "version = 3\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\ndependencies = [\"serde\"]\n\n[[package]]\nname = \"serde\"\nversion = \"1.0.200\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"ddc6f9cc94d67c0e21aaf7eda3a010fd3af78ebf6e096aa6e2e13c79749cce4f\"\n";
        let p = parse_cargo_lock(lock, "/src/Cargo.lock").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[1].name.as_str(), p[1].version.as_str()),
            ("serde", "1.0.200")
        );
        assert!(parse_cargo_lock("[[package]]\nname = 3\n", "/x").is_err());
    }

    #[test]
    fn npm_lock_v3_and_v1() {
        let v3 = r#"{"lockfileVersion":3,"packages":{"":{"name":"app","version":"1.0.0"},
            "node_modules/left-pad":{"version":"1.3.0","license":"WTFPL","resolved":"https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz"},
            "node_modules/@scope/x":{"version":"2.0.0"},
            "packages/local":{"link":true}}}"#;
        let p = parse_npm_lock(v3, "/app/package-lock.json").unwrap();
        let mut names: Vec<_> = p
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        // Key order depends on serde_json's features in the build.
        names.sort();
        assert_eq!(names, [("@scope/x", "2.0.0"), ("left-pad", "1.3.0")]);
        let v1 = r#"{"lockfileVersion":1,"dependencies":{"a":{"version":"1.0.0","dependencies":{"b":{"version":"2.0.0"}}}}}"#;
        assert_eq!(parse_npm_lock(v1, "/x").unwrap().len(), 2);
    }

    #[test]
    fn requirements_keep_pinned_versions() {
        let txt = "# deps\n-r base.txt\nrequests==2.31.0 \\\n    --hash=sha256:abc\nflask[async]==3.0.0 ; python_version >= \"3.8\"\nnumpy>=1.0\nDjango===4.2.1 # lts\n";
        let p = parse_requirements(txt, "/requirements.txt");
        let names: Vec<_> = p
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("requests", "2.31.0"),
                ("flask", "3.0.0"),
                ("Django", "4.2.1")
            ]
        );
    }

    #[test]
    fn poetry_and_go() {
        let poetry = "[[package]]\nname = \"attrs\"\nversion = \"23.1.0\"\ndescription = \"Classes\"\n\n[metadata]\nlock-version = \"2.0\"\n";
        assert_eq!(parse_poetry_lock(poetry, "/p").unwrap()[0].name, "attrs");
        let sum = "golang.org/x/text v0.14.0 h1:abc=\ngolang.org/x/text v0.14.0/go.mod h1:def=\ngithub.com/only/mod v1.0.0/go.mod h1:x=\n";
        let p = parse_go_sum(sum, "/go.sum");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].version, "v0.14.0");
    }
}

//! The differential parity suite: small Dockerfile cases (tests/parity/cases),
//! each built by BuildKit (recorded once into tests/parity/expected) and by
//! kiln, compared as normalised snapshots of the image config and of every
//! path that differs from the base image.
//!
//! One reader serves both builders: a `docker save` archive (what Docker
//! gives and what kiln's `type=docker` output writes) is unpacked in memory,
//! layer by layer, with whiteouts and hardlinks, into a path → entry map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// The image every case starts from, loaded into Docker under this name and
/// given to kiln as a named context of the same name.
pub const BASE_REF: &str = "parity-base:1";

/// The config keys a snapshot keeps (null counts as absent: Go's encoder
/// writes `null` for unset slices, which every reader treats as missing).
const CONFIG_KEYS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "User",
    "WorkingDir",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "Healthcheck",
    "StopSignal",
    "Shell",
    "OnBuild",
];

/// tests/parity in this repository.
pub fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("parity")
}

/// One case: a Dockerfile, its context and its build options.
#[derive(Debug, Clone, Default)]
pub struct Case {
    pub name: String,
    pub build_args: Vec<String>,
    pub target: Option<String>,
    pub dockerfile: Option<String>,
    pub secrets: Vec<(String, String)>,
    pub modes: Vec<(String, u32)>,
    pub symlinks: Vec<(String, String)>,
    pub hardlinks: Vec<(String, String)>,
    pub dirs: Vec<String>,
    /// `tar: ARCHIVE <- DIR`: DIR (written by the case) packed into ARCHIVE, then removed.
    pub tars: Vec<(String, String)>,
    /// `gzip: PATH`: the file compressed in place (no name, no mtime);
    /// `bzip2: PATH` and `xz: PATH` likewise.
    pub gzips: Vec<String>,
    pub bzip2s: Vec<String>,
    pub xzs: Vec<String>,
    pub expect_error: bool,
    pub files: Vec<(String, String)>,
}

impl Case {
    /// Parses the case format (README in tests/parity): directives, then
    /// `-- path --` sections holding the context files.
    pub fn parse(name: &str, text: &str) -> Result<Case, String> {
        let mut case = Case {
            name: name.to_string(),
            ..Default::default()
        };
        let mut current: Option<(String, String)> = None;
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let trimmed = line.trim_end_matches('\n');
            if let Some(path) = trimmed
                .strip_prefix("-- ")
                .and_then(|r| r.strip_suffix(" --"))
            {
                if let Some(done) = current.take() {
                    case.files.push(done);
                }
                current = Some((path.to_string(), String::new()));
                continue;
            }
            if let Some((_, content)) = current.as_mut() {
                content.push_str(line);
                continue;
            }
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (key, value) = trimmed
                .split_once(':')
                .ok_or_else(|| format!("{name}:{}: expected `key: value`", i + 1))?;
            let value = value.trim().to_string();
            let pair = |sep: &str| -> Result<(String, String), String> {
                value
                    .split_once(sep)
                    .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
                    .ok_or_else(|| format!("{name}:{}: {key} needs `{sep}`", i + 1))
            };
            match key {
                "build-arg" => case.build_args.push(value),
                "target" => case.target = Some(value),
                "file" => case.dockerfile = Some(value),
                "secret" => case.secrets.push(pair("=")?),
                "mode" => {
                    let (path, mode) = pair(" ")?;
                    let mode = u32::from_str_radix(&mode, 8)
                        .map_err(|e| format!("{name}:{}: mode: {e}", i + 1))?;
                    case.modes.push((path, mode));
                }
                "symlink" => case.symlinks.push(pair("->")?),
                "hardlink" => case.hardlinks.push(pair("->")?),
                "dir" => case.dirs.push(value),
                "tar" => case.tars.push(pair("<-")?),
                "gzip" => case.gzips.push(value),
                "bzip2" => case.bzip2s.push(value),
                "xz" => case.xzs.push(value),
                "expect" if value == "error" => case.expect_error = true,
                other => return Err(format!("{name}:{}: unknown directive {other:?}", i + 1)),
            }
        }
        case.files.extend(current);
        if case.files.is_empty() {
            return Err(format!(
                "{name}: no files (a case needs at least a Dockerfile)"
            ));
        }
        Ok(case)
    }

    /// Writes the context into `dir` (which must exist).
    pub fn materialize(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (path, content) in &self.files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().expect("parent"))?;
            std::fs::write(&p, content)?;
        }
        for d in &self.dirs {
            std::fs::create_dir_all(dir.join(d))?;
        }
        for (path, target) in &self.symlinks {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().expect("parent"))?;
            std::os::unix::fs::symlink(target, &p)?;
        }
        for (path, existing) in &self.hardlinks {
            std::fs::hard_link(dir.join(existing), dir.join(path))?;
        }
        for (archive, source) in &self.tars {
            let file = std::fs::File::create(dir.join(archive))?;
            let mut builder = tar::Builder::new(file);
            builder.mode(tar::HeaderMode::Deterministic);
            builder.follow_symlinks(false);
            builder.append_dir_all(".", dir.join(source))?;
            builder.into_inner()?;
            std::fs::remove_dir_all(dir.join(source))?;
        }
        for path in &self.gzips {
            use std::io::Write;
            let data = std::fs::read(dir.join(path))?;
            let mut gz = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::default());
            gz.write_all(&data)?;
            std::fs::write(dir.join(path), gz.finish()?)?;
        }
        for path in &self.bzip2s {
            use std::io::Write;
            let data = std::fs::read(dir.join(path))?;
            let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            w.write_all(&data)?;
            std::fs::write(dir.join(path), w.finish()?)?;
        }
        for path in &self.xzs {
            use std::io::Write;
            let data = std::fs::read(dir.join(path))?;
            let mut w = liblzma::write::XzEncoder::new(Vec::new(), 6);
            w.write_all(&data)?;
            std::fs::write(dir.join(path), w.finish()?)?;
        }
        for (path, mode) in &self.modes {
            std::fs::set_permissions(dir.join(path), std::fs::Permissions::from_mode(*mode))?;
        }
        Ok(())
    }

    /// The build flags both `docker build` and `kilnctl build` accept;
    /// secrets are written into `secrets_dir`.
    pub fn build_flags(&self, context: &Path, secrets_dir: &Path) -> std::io::Result<Vec<String>> {
        let mut flags = Vec::new();
        for a in &self.build_args {
            flags.extend(["--build-arg".to_string(), a.clone()]);
        }
        if let Some(t) = &self.target {
            flags.extend(["--target".to_string(), t.clone()]);
        }
        if let Some(f) = &self.dockerfile {
            flags.extend(["-f".to_string(), context.join(f).display().to_string()]);
        }
        for (id, content) in &self.secrets {
            let file = secrets_dir.join(id);
            std::fs::write(&file, content)?;
            flags.extend([
                "--secret".to_string(),
                format!("id={id},src={}", file.display()),
            ]);
        }
        Ok(flags)
    }
}

/// Every case under tests/parity/cases (any depth), sorted by name.
pub fn load_cases() -> Result<Vec<Case>, String> {
    let mut cases = Vec::new();
    let mut stack = vec![parity_dir().join("cases")];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "case") {
                let name = path
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .to_string();
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                cases.push(Case::parse(&name, &text)?);
            }
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = cases.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!("two cases are named {}", w[0].name));
    }
    Ok(cases)
}

/// The expected snapshot file of a case.
pub fn expected_path(name: &str) -> PathBuf {
    parity_dir().join("expected").join(format!("{name}.json"))
}

/// A filesystem entry after all layers: its description (what is compared)
/// and the inode it shares with its hardlinks.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    desc: String,
    inode: u64,
}

/// An image unpacked in memory: its config and final file tree.
pub struct Image {
    pub config: Value,
    tree: BTreeMap<String, Entry>,
}

fn clean(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn short_hash(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn describe_content(data: &[u8]) -> String {
    let mut s = format!("size={} sha256:{}", data.len(), short_hash(data));
    // Small text stays readable in the snapshot and in a failing diff.
    if data.len() <= 80
        && let Ok(text) = std::str::from_utf8(data)
        && text
            .chars()
            .all(|c| !c.is_control() || c == '\n' || c == '\t')
    {
        s.push(' ');
        s.push_str(&serde_json::to_string(text).expect("string"));
    }
    s
}

fn decompress(data: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    let mut out = Vec::new();
    if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .map_err(|e| format!("gunzip layer: {e}"))?;
        Ok(out.into())
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(data)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| format!("unzstd layer: {e}"))?;
        Ok(out.into())
    } else {
        Ok(data.into())
    }
}

impl Image {
    /// Reads a `docker save` archive holding one image.
    pub fn read_docker_archive(path: &Path) -> Result<Image, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut members: HashMap<String, Vec<u8>> = HashMap::new();
        // `docker save` writes a layer listed twice as a symlink to the first.
        let mut links: HashMap<String, String> = HashMap::new();
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let name = entry
                .path()
                .map_err(|e| e.to_string())?
                .display()
                .to_string();
            let name = name.trim_start_matches("./").to_string();
            if entry.header().entry_type().is_symlink() {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .map(|l| l.display().to_string())
                    .unwrap_or_default();
                let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let resolved = clean(&format!("{dir}/{target}"));
                links.insert(name, resolved.trim_start_matches('/').to_string());
                continue;
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
            members.insert(name, data);
        }
        let manifest: Value = serde_json::from_slice(
            members
                .get("manifest.json")
                .ok_or("not a docker archive: no manifest.json")?,
        )
        .map_err(|e| format!("manifest.json: {e}"))?;
        let item = &manifest[0];
        let config_name = item["Config"].as_str().ok_or("manifest without Config")?;
        let config: Value = serde_json::from_slice(
            members
                .get(config_name)
                .ok_or_else(|| format!("missing {config_name}"))?,
        )
        .map_err(|e| format!("{config_name}: {e}"))?;
        let mut image = Image {
            config,
            tree: BTreeMap::new(),
        };
        let mut next_inode = 1u64;
        for layer in item["Layers"].as_array().ok_or("manifest without Layers")? {
            let name = layer.as_str().ok_or("layer name")?;
            // `docker save` stores a layer listed twice once.
            let name = links.get(name).map(String::as_str).unwrap_or(name);
            let data = members
                .get(name)
                .ok_or_else(|| format!("missing layer {name}"))?;
            image.apply_layer(&decompress(data)?, &mut next_inode)?;
        }
        Ok(image)
    }

    fn apply_layer(&mut self, layer: &[u8], next_inode: &mut u64) -> Result<(), String> {
        let mut archive = tar::Archive::new(layer);
        let lower: BTreeSet<String> = self.tree.keys().cloned().collect();
        let remove_under = |tree: &mut BTreeMap<String, Entry>, dir: &str, only_lower: bool| {
            let prefix = if dir == "/" {
                "/".to_string()
            } else {
                format!("{dir}/")
            };
            let doomed: Vec<String> = tree
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .filter(|k| !only_lower || lower.contains(k))
                .collect();
            for k in doomed {
                tree.remove(&k);
            }
        };
        for entry in archive.entries().map_err(|e| format!("layer: {e}"))? {
            let mut entry = entry.map_err(|e| format!("layer: {e}"))?;
            let path = clean(
                &entry
                    .path()
                    .map_err(|e| e.to_string())?
                    .display()
                    .to_string(),
            );
            let (dir, base) = match path.rsplit_once('/') {
                Some(("", b)) => ("/", b),
                Some((d, b)) => (d, b),
                None => ("/", path.as_str()),
            };
            if base == ".wh..wh..opq" {
                remove_under(&mut self.tree, dir, true);
                continue;
            }
            if let Some(victim) = base.strip_prefix(".wh.") {
                let victim = clean(&format!("{dir}/{victim}"));
                self.tree.remove(&victim);
                remove_under(&mut self.tree, &victim, false);
                continue;
            }
            let header = entry.header().clone();
            let mode = header.mode().map_err(|e| e.to_string())? & 0o7777;
            let uid = header.uid().map_err(|e| e.to_string())?;
            let gid = header.gid().map_err(|e| e.to_string())?;
            let owner = format!("{mode:04o} {uid}:{gid}");
            let mut xattrs = Vec::new();
            if let Some(exts) = entry.pax_extensions().map_err(|e| e.to_string())? {
                for ext in exts.flatten() {
                    if let Some(name) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr."))
                    {
                        xattrs.push(format!(" xattr:{name}={}", short_hash(ext.value_bytes())));
                    }
                }
            }
            xattrs.sort();
            use tar::EntryType as T;
            let kind = header.entry_type();
            if kind == T::Link {
                let target = clean(
                    &entry
                        .link_name()
                        .map_err(|e| e.to_string())?
                        .ok_or("hardlink without target")?
                        .display()
                        .to_string(),
                );
                let existing = self
                    .tree
                    .get(&target)
                    .cloned()
                    .ok_or_else(|| format!("hardlink {path} to missing {target}"))?;
                self.tree.insert(path, existing);
                continue;
            }
            let desc = match kind {
                T::Directory => format!("dir {owner}"),
                T::Symlink => format!(
                    "symlink {uid}:{gid} -> {}",
                    entry
                        .link_name()
                        .map_err(|e| e.to_string())?
                        .map(|l| l.display().to_string())
                        .unwrap_or_default()
                ),
                T::Char | T::Block => format!(
                    "{} {owner} {},{}",
                    if kind == T::Char { "char" } else { "block" },
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0)
                ),
                T::Fifo => format!("fifo {owner}"),
                T::Regular | T::Continuous => {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
                    format!("file {owner} {}", describe_content(&data))
                }
                other => format!("other({other:?}) {owner}"),
            } + &xattrs.concat();
            // A directory entry replaces a directory's metadata, not its children.
            if kind != T::Directory {
                remove_under(&mut self.tree, &path, false);
            }
            *next_inode += 1;
            self.tree.insert(
                path,
                Entry {
                    desc,
                    inode: *next_inode,
                },
            );
        }
        Ok(())
    }

    /// The normalised snapshot of this image against `base`.
    pub fn snapshot(&self, base: &Image) -> Value {
        let mut config = Map::new();
        let c = &self.config["config"];
        for key in CONFIG_KEYS {
            match c.get(*key) {
                None | Some(Value::Null) => {}
                Some(v) => {
                    config.insert(key.to_string(), v.clone());
                }
            }
        }
        let mut files = Map::new();
        for (path, entry) in &self.tree {
            if base.tree.get(path).map(|e| &e.desc) != Some(&entry.desc) {
                files.insert(path.clone(), Value::String(entry.desc.clone()));
            }
        }
        for path in base.tree.keys() {
            let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            let parent_kept = parent.is_empty() || self.tree.contains_key(parent);
            if !self.tree.contains_key(path) && parent_kept {
                files.insert(path.clone(), Value::String("deleted".into()));
            }
        }
        let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (path, entry) in &self.tree {
            groups.entry(entry.inode).or_default().push(path.clone());
        }
        let mut hardlinks: Vec<Vec<String>> = groups
            .into_values()
            .filter(|g| g.len() > 1 && g.iter().any(|p| files.contains_key(p)))
            .collect();
        hardlinks.sort();
        json!({ "config": config, "files": files, "hardlinks": hardlinks })
    }
}

/// The differences between an expected snapshot and kiln's, one line each;
/// empty when they agree. A `"partial": true` expectation (written by hand
/// for features the recorded BuildKit lacks) checks only the keys and paths
/// it names.
pub fn compare(expected: &Value, actual: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let partial = expected["partial"] == true;
    let exp_cfg = expected["config"].as_object().cloned().unwrap_or_default();
    let act_cfg = actual["config"].as_object().cloned().unwrap_or_default();
    let keys: BTreeSet<&String> = if partial {
        exp_cfg.keys().collect()
    } else {
        exp_cfg.keys().chain(act_cfg.keys()).collect()
    };
    for key in keys {
        let (e, a) = (exp_cfg.get(key), act_cfg.get(key));
        if e != a {
            diffs.push(format!(
                "config {key}: BuildKit {} kiln {}",
                e.map_or("absent".into(), |v| v.to_string()),
                a.map_or("absent".into(), |v| v.to_string())
            ));
        }
    }
    let exp_files = expected["files"].as_object().cloned().unwrap_or_default();
    let act_files = actual["files"].as_object().cloned().unwrap_or_default();
    let paths: BTreeSet<&String> = if partial {
        exp_files.keys().collect()
    } else {
        exp_files.keys().chain(act_files.keys()).collect()
    };
    for path in paths {
        let (e, a) = (exp_files.get(path), act_files.get(path));
        if e != a {
            let show =
                |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("unchanged").to_string();
            diffs.push(format!("{path}: BuildKit {} | kiln {}", show(e), show(a)));
        }
    }
    if expected.get("hardlinks").is_some() && expected["hardlinks"] != actual["hardlinks"] {
        diffs.push(format!(
            "hardlinks: BuildKit {} kiln {}",
            expected["hardlinks"], actual["hardlinks"]
        ));
    }
    diffs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directives_and_files() {
        let c = Case::parse(
            "x",
            "# about\nbuild-arg: A=1\nsymlink: l -> a.txt\nmode: a.txt 0755\nexpect: error\n-- Dockerfile --\nFROM x\n\n-- a.txt --\nhi\n",
        )
        .unwrap();
        assert_eq!(c.build_args, ["A=1"]);
        assert_eq!(c.symlinks, [("l".into(), "a.txt".into())]);
        assert_eq!(c.modes, [("a.txt".into(), 0o755)]);
        assert!(c.expect_error);
        assert_eq!(c.files[0], ("Dockerfile".into(), "FROM x\n\n".into()));
        assert_eq!(c.files[1], ("a.txt".into(), "hi\n".into()));
        assert!(Case::parse("y", "bogus: 1\n-- Dockerfile --\n").is_err());
    }

    #[test]
    fn every_case_has_an_expectation_and_the_docs_count_them() {
        let cases = load_cases().unwrap();
        let mut recorded = 0;
        for c in &cases {
            let text = std::fs::read_to_string(expected_path(&c.name))
                .unwrap_or_else(|e| panic!("{}: no expected snapshot ({e})", c.name));
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["source"].is_string(),
                "{}: the expectation names its source",
                c.name
            );
            if v["partial"] != true {
                recorded += 1;
            }
        }
        let docs =
            std::fs::read_to_string(parity_dir().join("../../docs/dockerfile-support.md")).unwrap();
        assert!(
            docs.contains(&format!("**{} cases**", cases.len()))
                && docs.contains(&format!("**{recorded} were recorded")),
            "docs/dockerfile-support.md must state {} cases, {recorded} recorded",
            cases.len()
        );
    }

    #[test]
    fn partial_expectations_check_only_what_they_name() {
        let actual = json!({"config": {"Env": ["A=1"], "Cmd": ["x"]}, "files": {"/a": "file", "/b": "dir"}, "hardlinks": []});
        let partial = json!({"partial": true, "config": {"Env": ["A=1"]}, "files": {"/a": "file"}});
        assert!(compare(&partial, &actual).is_empty());
        let full = json!({"config": {"Env": ["A=1"]}, "files": {"/a": "file"}, "hardlinks": []});
        let d = compare(&full, &actual);
        assert_eq!(d.len(), 2, "{d:?}");
    }
}

//! What software a root filesystem holds, as an SPDX 2.3 document: the
//! SBOM kiln attaches to images (`--sbom`), made by kiln itself rather than
//! a scanner image. Operating system packages come from dpkg's and apk's
//! databases, language packages from the lockfiles found anywhere in the
//! filesystem. The walk is bounded and never follows a symlink (see
//! [`walk`]), since the filesystem is the build's, and so untrusted.

mod lang;
mod os;
pub mod spdx;
pub mod walk;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub use os::Distro;

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error("scanning {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a package comes from: its package URL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ecosystem {
    Deb,
    Apk,
    Cargo,
    Npm,
    PyPI,
    Go,
}

impl Ecosystem {
    pub fn purl_type(self) -> &'static str {
        match self {
            Ecosystem::Deb => "deb",
            Ecosystem::Apk => "apk",
            Ecosystem::Cargo => "cargo",
            Ecosystem::Npm => "npm",
            Ecosystem::PyPI => "pypi",
            Ecosystem::Go => "golang",
        }
    }

    /// What the package database is called in `sourceInfo`.
    fn database(self) -> &'static str {
        match self {
            Ecosystem::Deb => "DPKG DB",
            Ecosystem::Apk => "APK DB",
            Ecosystem::Cargo => "Cargo.lock",
            Ecosystem::Npm => "package-lock.json",
            Ecosystem::PyPI => "Python lockfile",
            Ecosystem::Go => "go.sum",
        }
    }
}

/// One package found in the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub ecosystem: Ecosystem,
    pub name: String,
    pub version: String,
    pub arch: Option<String>,
    /// The source package (dpkg `Source`, apk origin) when it has one.
    pub source_package: Option<String>,
    /// The license the package declares, as written.
    pub license: Option<String>,
    /// The maintainer, as written (`Name <email>`).
    pub supplier: Option<String>,
    pub homepage: Option<String>,
    pub description: Option<String>,
    /// The file it was found in (absolute in the image), shared by every
    /// package of that file.
    pub found_at: std::sync::Arc<str>,
}

impl Package {
    /// A package with only what every reader knows.
    pub fn new(
        ecosystem: Ecosystem,
        name: &str,
        version: &str,
        found_at: &std::sync::Arc<str>,
    ) -> Package {
        Package {
            ecosystem,
            name: name.to_string(),
            version: version.to_string(),
            arch: None,
            source_package: None,
            license: None,
            supplier: None,
            homepage: None,
            description: None,
            found_at: found_at.clone(),
        }
    }

    /// Cuts every field an image wrote to [`MAX_FIELD`] bytes; the bytes it
    /// then holds.
    fn bound_fields(&mut self) -> usize {
        let cut = |s: &mut String| {
            if s.len() > MAX_FIELD {
                let mut end = MAX_FIELD;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
                s.shrink_to_fit();
            }
            s.len()
        };
        let mut n = cut(&mut self.name) + cut(&mut self.version);
        for f in [
            &mut self.arch,
            &mut self.source_package,
            &mut self.license,
            &mut self.supplier,
            &mut self.homepage,
            &mut self.description,
        ]
        .into_iter()
        .flatten()
        {
            n += cut(f);
        }
        n + std::mem::size_of::<Package>()
    }

    /// The package URL (github.com/package-url/purl-spec), as syft writes
    /// them for the same packages.
    pub fn purl(&self, distro: Option<&Distro>) -> String {
        let t = self.ecosystem.purl_type();
        let mut qualifiers: Vec<(&str, String)> = Vec::new();
        let (namespace, name) = match self.ecosystem {
            Ecosystem::Deb | Ecosystem::Apk => {
                let ns = distro
                    .map(|d| d.id.clone())
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| {
                        if self.ecosystem == Ecosystem::Deb {
                            "debian"
                        } else {
                            "alpine"
                        }
                        .into()
                    });
                if let Some(a) = &self.arch {
                    qualifiers.push(("arch", a.clone()));
                }
                if let Some(s) = self.source_package.as_ref().filter(|s| **s != self.name) {
                    qualifiers.push(("upstream", s.clone()));
                }
                if let Some(d) = distro.filter(|d| !d.id.is_empty()) {
                    qualifiers.push(("distro", format!("{}-{}", d.id, d.version_id)));
                }
                (Some(ns), self.name.clone())
            }
            Ecosystem::Npm => match self.name.strip_prefix('@').and_then(|n| n.split_once('/')) {
                Some((scope, n)) => (Some(format!("@{scope}")), n.to_string()),
                None => (None, self.name.clone()),
            },
            // PyPI names are compared normalised (PEP 503).
            Ecosystem::PyPI => (None, self.name.to_lowercase().replace('_', "-")),
            Ecosystem::Go => match self.name.rsplit_once('/') {
                Some((ns, n)) => (Some(ns.to_string()), n.to_string()),
                None => (None, self.name.clone()),
            },
            Ecosystem::Cargo => (None, self.name.clone()),
        };
        let mut s = format!("pkg:{t}/");
        if let Some(ns) = namespace {
            let parts: Vec<String> = ns.split('/').map(purl_escape).collect();
            s.push_str(&parts.join("/"));
            s.push('/');
        }
        s.push_str(&purl_escape(&name));
        s.push('@');
        s.push_str(&purl_escape(&self.version));
        if !qualifiers.is_empty() {
            qualifiers.sort();
            let q: Vec<String> = qualifiers
                .iter()
                .map(|(k, v)| format!("{k}={}", purl_escape(v)))
                .collect();
            s.push('?');
            s.push_str(&q.join("&"));
        }
        s
    }
}

/// Percent-encodes what a purl component may not hold as is.
fn purl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~+:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Everything a scan found.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub distro: Option<Distro>,
    /// Sorted, without duplicates.
    pub packages: Vec<Package>,
    /// Files that could not be read, limits reached: shown as warnings.
    pub notes: Vec<String>,
}

/// At most this many packages are reported per filesystem (and read from
/// one file).
pub const MAX_PACKAGES: usize = 200_000;

/// Longest field of a package kept (names, versions, descriptions...).
pub const MAX_FIELD: usize = 1024;

/// Most bytes of package data one scan holds: hard links to one huge file
/// would otherwise each add its packages again.
pub const MAX_INVENTORY_BYTES: usize = 64 << 20;

/// Scans the filesystem at `root` (an image's merged view).
pub fn scan(root: &Path) -> Result<Inventory, SbomError> {
    let found = walk::find(root)?;
    let mut inv = Inventory {
        notes: found.notes,
        ..Default::default()
    };
    let mut packages = Vec::new();
    let mut kept_bytes = 0usize;
    for (rel, kind) in &found.files {
        let text = match walk::read(root, rel) {
            Ok(t) => t,
            Err(e) => {
                inv.notes.push(e);
                continue;
            }
        };
        let at: std::sync::Arc<str> = format!("/{rel}").into();
        let parsed = match kind {
            walk::FileKind::OsRelease => {
                // /etc wins over /usr/lib (sorted first).
                if inv.distro.is_none() {
                    inv.distro = Some(os::parse_os_release(&text));
                }
                continue;
            }
            walk::FileKind::DpkgStatus => Ok(os::parse_dpkg_status(&text, &at)),
            walk::FileKind::ApkInstalled => Ok(os::parse_apk_installed(&text, &at)),
            walk::FileKind::CargoLock => lang::parse_cargo_lock(&text, &at),
            walk::FileKind::NpmLock => lang::parse_npm_lock(&text, &at),
            walk::FileKind::PythonRequirements => Ok(lang::parse_requirements(&text, &at)),
            walk::FileKind::PoetryLock => lang::parse_poetry_lock(&text, &at),
            walk::FileKind::GoSum => Ok(lang::parse_go_sum(&text, &at)),
        };
        let mut full = false;
        match parsed {
            Ok(found) => {
                for mut p in found {
                    kept_bytes += p.bound_fields();
                    packages.push(p);
                    if packages.len() > MAX_PACKAGES || kept_bytes > MAX_INVENTORY_BYTES {
                        full = true;
                        break;
                    }
                }
            }
            Err(e) => inv.notes.push(format!("{at}: not read: {e}")),
        }
        if full {
            inv.notes.push(format!(
                "more than {MAX_PACKAGES} packages or {} MiB of package data: the rest were not recorded",
                MAX_INVENTORY_BYTES >> 20
            ));
            packages.truncate(MAX_PACKAGES);
            break;
        }
    }
    let mut seen = BTreeSet::new();
    packages.retain(|p| {
        seen.insert((
            p.ecosystem,
            p.name.clone(),
            p.version.clone(),
            p.found_at.clone(),
        ))
    });
    packages.sort_by(|a, b| {
        (a.ecosystem, &a.name, &a.version, &a.found_at).cmp(&(
            b.ecosystem,
            &b.name,
            &b.version,
            &b.found_at,
        ))
    });
    inv.packages = packages;
    Ok(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(e: Ecosystem, name: &str, version: &str) -> Package {
        Package::new(e, name, version, &"/x".into())
    }

    #[test]
    fn purls_as_syft_writes_them() {
        let debian = Distro {
            id: "debian".into(),
            version_id: "12".into(),
            pretty_name: String::new(),
        };
        let mut bash = pkg(Ecosystem::Deb, "libc6", "2.36-9+deb12u4");
        bash.arch = Some("amd64".into());
        bash.source_package = Some("glibc".into());
        assert_eq!(
            bash.purl(Some(&debian)),
            "pkg:deb/debian/libc6@2.36-9+deb12u4?arch=amd64&distro=debian-12&upstream=glibc"
        );
        assert_eq!(
            pkg(Ecosystem::Npm, "@types/node", "20.1.0").purl(None),
            "pkg:npm/%40types/node@20.1.0"
        );
        assert_eq!(
            pkg(Ecosystem::Go, "golang.org/x/text", "v0.14.0").purl(None),
            "pkg:golang/golang.org/x/text@v0.14.0"
        );
        assert_eq!(
            pkg(Ecosystem::PyPI, "Typing_Extensions", "4.8.0").purl(None),
            "pkg:pypi/typing-extensions@4.8.0"
        );
    }

    #[test]
    fn scans_a_filesystem() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("var/lib/dpkg")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("srv/app")).unwrap();
        std::fs::create_dir_all(r.join("proc/1")).unwrap();
        std::fs::write(
            r.join("var/lib/dpkg/status"),
            "Package: dash\nStatus: install ok installed\nVersion: 0.5.12-2\nArchitecture: amd64\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\n").unwrap();
        std::fs::write(r.join("srv/app/requirements.txt"), "requests==2.31.0\n").unwrap();
        std::fs::write(r.join("srv/app/package-lock.json"), "{not json").unwrap();
        // The kernel's views are not the image's.
        std::fs::write(r.join("proc/1/go.sum"), "a v1 h1:x\n").unwrap();
        let inv = scan(r).unwrap();
        let names: Vec<_> = inv.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["dash", "requests"]);
        assert_eq!(inv.distro.unwrap().id, "debian");
        assert!(
            inv.notes.iter().any(|n| n.contains("package-lock.json")),
            "{:?}",
            inv.notes
        );
    }

    /// A file of enormous names, hard-linked many times, and a lock file
    /// of more packages than a scan keeps: the inventory stays bounded.
    #[test]
    fn what_a_scan_holds_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("requirements.txt");
        std::fs::write(&big, format!("{}==1\n", "n".repeat(2 << 20))).unwrap();
        for i in 0..50 {
            let dir = d.path().join(format!("app{i}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::hard_link(&big, dir.join("requirements.txt")).unwrap();
        }
        let mut sum = String::new();
        for i in 0..(MAX_PACKAGES + 10) {
            sum.push_str(&format!("example.com/m{i} v1.0.0 h1:x=\n"));
        }
        std::fs::write(d.path().join("go.sum"), sum).unwrap();
        let inv = scan(d.path()).unwrap();
        assert!(inv.packages.len() <= MAX_PACKAGES);
        assert!(inv.packages.iter().all(|p| p.name.len() <= MAX_FIELD));
        assert!(
            inv.notes
                .iter()
                .any(|n| n.contains("the rest were not recorded")),
            "{:?}",
            inv.notes
        );
    }
}

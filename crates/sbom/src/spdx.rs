//! The SPDX 2.3 JSON document of an inventory (spdx.github.io/spdx-spec/v2.3):
//! a root package for the scanned filesystem, the operating system when
//! os-release names one, and one package per package found, each with its
//! package URL, all CONTAINED by the root. Deterministic: the same
//! filesystem and time give the same bytes, so an attestation's digest is
//! reproducible under SOURCE_DATE_EPOCH.

use serde_json::{Value, json};

use crate::{Inventory, Package};

pub const PREDICATE_TYPE: &str = "https://spdx.dev/Document";

/// SPDX license identifiers common in package metadata. A declared license
/// made only of these (with AND/OR/WITH) is reported as an expression;
/// anything else as NOASSERTION with the text in a comment, since an
/// unknown identifier makes the document invalid.
const KNOWN_LICENSES: &[&str] = &[
    "0BSD",
    "AFL-3.0",
    "AGPL-3.0-only",
    "AGPL-3.0-or-later",
    "Apache-1.1",
    "Apache-2.0",
    "Artistic-2.0",
    "BSD-1-Clause",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSD-4-Clause",
    "BSL-1.0",
    "CC-BY-3.0",
    "CC-BY-4.0",
    "CC-BY-SA-4.0",
    "CC0-1.0",
    "CDDL-1.0",
    "EPL-1.0",
    "EPL-2.0",
    "GPL-1.0-or-later",
    "GPL-2.0-only",
    "GPL-2.0-or-later",
    "GPL-3.0-only",
    "GPL-3.0-or-later",
    "ISC",
    "LGPL-2.0-only",
    "LGPL-2.0-or-later",
    "LGPL-2.1-only",
    "LGPL-2.1-or-later",
    "LGPL-3.0-only",
    "LGPL-3.0-or-later",
    "MIT",
    "MIT-0",
    "MPL-1.1",
    "MPL-2.0",
    "OpenSSL",
    "PostgreSQL",
    "PSF-2.0",
    "Python-2.0",
    "Ruby",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Unlicense",
    "W3C",
    "WTFPL",
    "X11",
    "Zlib",
    "zlib-acknowledgement",
    "bzip2-1.0.6",
    "curl",
    "GCC-exception-3.1",
    "Classpath-exception-2.0",
    "LLVM-exception",
];

/// `text` as an SPDX license expression, if it is one of known identifiers.
fn license_expression(text: &str) -> Option<String> {
    let spaced = text
        .replace('(', " ( ")
        .replace(')', " ) ")
        .replace('/', " OR ");
    let mut words = Vec::new();
    let mut depth = 0i32;
    for w in spaced.split_whitespace() {
        match w {
            "AND" | "OR" | "WITH" => words.push(w.to_string()),
            "and" | "or" => words.push(w.to_uppercase()),
            "(" => {
                depth += 1;
                words.push(w.into());
            }
            ")" => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
                words.push(w.into());
            }
            id => {
                let known = KNOWN_LICENSES.iter().find(|k| k.eq_ignore_ascii_case(id))?;
                words.push((*known).to_string());
            }
        }
    }
    (depth == 0 && !words.is_empty()).then(|| words.join(" ").replace("( ", "(").replace(" )", ")"))
}

/// An SPDX actor from `Name <email>`, if it can be written as one.
fn supplier(text: &str) -> Option<String> {
    let (name, email) = match text.split_once('<') {
        Some((n, rest)) => (n.trim(), rest.split('>').next().unwrap_or("").trim()),
        None => (text.trim(), ""),
    };
    let clean = |s: &str| !s.is_empty() && !s.contains(['(', ')', '\n']);
    if !clean(name) {
        return None;
    }
    Some(if clean(email) {
        format!("Person: {name} ({email})")
    } else {
        format!("Person: {name}")
    })
}

/// Characters an SPDXID may hold: letters, digits, `.` and `-`.
fn id_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

fn package_json(p: &Package, inv: &Inventory) -> (String, Value) {
    let tag = kiln_digest::Digest::of(
        format!(
            "{}\0{}\0{}\0{}",
            p.ecosystem.purl_type(),
            p.name,
            p.version,
            p.found_at
        )
        .as_bytes(),
    );
    let id = format!(
        "SPDXRef-Package-{}-{}-{}",
        p.ecosystem.purl_type(),
        id_part(&p.name),
        &tag.hex()[..16]
    );
    let mut v = json!({
        "name": p.name,
        "SPDXID": id,
        "versionInfo": p.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "sourceInfo": format!("acquired package info from {}: {}", p.ecosystem.database(), p.found_at),
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": p.purl(inv.distro.as_ref()),
        }],
    });
    match p.license.as_deref().map(|l| (l, license_expression(l))) {
        Some((_, Some(expr))) => v["licenseDeclared"] = json!(expr),
        Some((raw, None)) => {
            v["licenseDeclared"] = json!("NOASSERTION");
            v["licenseComments"] = json!(format!("declared: {raw}"));
        }
        None => v["licenseDeclared"] = json!("NOASSERTION"),
    }
    if let Some(s) = p.supplier.as_deref().and_then(supplier) {
        v["supplier"] = json!(s);
    }
    if let Some(h) = p
        .homepage
        .as_deref()
        .filter(|h| h.starts_with("http://") || h.starts_with("https://"))
    {
        v["homepage"] = json!(h);
    }
    if let Some(d) = p.description.as_deref().filter(|d| !d.is_empty()) {
        v["summary"] = json!(d);
    }
    (id, v)
}

/// The document for the filesystem called `name` (the image or stage),
/// created at `created` (seconds since the epoch).
pub fn document(name: &str, inv: &Inventory, created: i64) -> Value {
    const ROOT: &str = "SPDXRef-DocumentRoot";
    let mut packages = vec![json!({
        "name": name,
        "SPDXID": ROOT,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": ROOT,
    })];
    let mut contains = |id: &str| {
        relationships.push(json!({
            "spdxElementId": ROOT,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }))
    };
    if let Some(d) = inv.distro.as_ref().filter(|d| !d.id.is_empty()) {
        let id = format!("SPDXRef-OperatingSystem-{}", id_part(&d.id));
        let mut os = json!({
            "name": d.id,
            "SPDXID": id,
            "versionInfo": d.version_id,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": "OPERATING-SYSTEM",
        });
        if !d.pretty_name.is_empty() {
            os["description"] = json!(d.pretty_name);
        }
        packages.push(os);
        contains(&id);
    }
    for p in &inv.packages {
        let (id, v) = package_json(p, inv);
        packages.push(v);
        contains(&id);
    }
    // The namespace is unique per content, as the spec asks, and stable.
    let body = serde_json::to_vec(&packages).unwrap_or_default();
    let namespace = format!(
        "https://kiln.dev/spdx/{}-{}",
        id_part(name),
        &kiln_digest::Digest::of(&body).hex()[..32]
    );
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": namespace,
        "creationInfo": {
            "created": rfc3339(created),
            "creators": [
                format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION")),
                "Organization: kiln",
            ],
        },
        "packages": packages,
        "relationships": relationships,
    })
}

use kiln_definition::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licenses_become_expressions_only_when_valid() {
        assert_eq!(
            license_expression("MIT OR Apache-2.0").as_deref(),
            Some("MIT OR Apache-2.0")
        );
        assert_eq!(
            license_expression("mit/apache-2.0").as_deref(),
            Some("MIT OR Apache-2.0")
        );
        assert_eq!(license_expression("(MIT)").as_deref(), Some("(MIT)"));
        assert_eq!(license_expression("GPL2+"), None);
        assert_eq!(license_expression("MIT)"), None);
    }

    #[test]
    fn suppliers_are_spdx_actors() {
        assert_eq!(
            supplier("Matthias Klose <doko@debian.org>").as_deref(),
            Some("Person: Matthias Klose (doko@debian.org)")
        );
        assert_eq!(supplier("(weird)"), None);
    }

    #[test]
    fn documents_are_deterministic() {
        let inv = Inventory::default();
        let a = document("img", &inv, 5);
        assert_eq!(a, document("img", &inv, 5));
        assert_eq!(a["spdxVersion"], "SPDX-2.3");
        assert_eq!(a["relationships"][0]["relationshipType"], "DESCRIBES");
    }
}

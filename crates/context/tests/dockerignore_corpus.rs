//! .dockerignore conformance over ../shared/corpus/buildkit-shell/dockerignore
//! (moby/patternmatcher's tables). KILN_CORPUS overrides the corpus path.

use std::path::PathBuf;

use kiln_context::dockerignore::{Matcher, read_patterns};

fn corpus() -> PathBuf {
    let p = std::env::var_os("KILN_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus")
        });
    assert!(
        p.join("README.md").exists(),
        "conformance corpus not found at {} (set KILN_CORPUS)",
        p.display()
    );
    p.join("buildkit-shell/dockerignore")
}

#[test]
fn read_all() {
    let data = std::fs::read(corpus().join("readall-input.dockerignore")).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus().join("readall-expected.json")).unwrap())
            .unwrap();
    let want: Vec<String> = want["expected_patterns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(read_patterns(&data), want);
}

#[test]
fn pattern_tables() {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus().join("pattern-matches.json")).unwrap())
            .unwrap();
    let mut n = 0;
    let mut failures = Vec::new();
    for row in v["single_pattern"].as_array().unwrap() {
        n += 1;
        let p = row["pattern"].as_str().unwrap();
        let path = row["path"].as_str().unwrap();
        let m = Matcher::new(&[p]).unwrap_or_else(|e| panic!("{p}: {e}"));
        if m.matches(path) != row["match"].as_bool().unwrap() {
            failures.push(format!("single {p:?} on {path:?}: want {}", row["match"]));
        }
    }
    for key in ["multi_pattern", "simple_matches"] {
        for row in v[key].as_array().unwrap() {
            n += 1;
            let pats: Vec<String> = row["patterns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            let path = row["path"].as_str().unwrap_or("");
            match Matcher::new(&pats) {
                Err(e) => {
                    if !row["error"].as_bool().unwrap_or(false) {
                        failures.push(format!("{key} {pats:?}: unexpected error {e}"));
                    }
                }
                Ok(m) => {
                    if row["error"].as_bool().unwrap_or(false) {
                        failures.push(format!("{key} {pats:?}: should fail to compile"));
                    } else if m.matches(path) != row["match"].as_bool().unwrap() {
                        failures.push(format!("{key} {pats:?} on {path:?}: want {}", row["match"]));
                    }
                }
            }
        }
    }
    assert!(n > 80, "only {n} rows");
    assert!(
        failures.is_empty(),
        "{} of {n} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

//! Conformance over ../shared/corpus (BuildKit's parser and shell cases, and
//! real-world Dockerfiles). The corpus is other people's work and lives outside
//! the repository: set KILN_CORPUS to point elsewhere.

use std::path::PathBuf;

use kiln_dockerfile::parser::{self, go_quote};
use kiln_dockerfile::shell::Lex;

fn corpus() -> PathBuf {
    let p = std::env::var_os("KILN_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus")
        });
    assert!(
        p.join("README.md").exists(),
        "conformance corpus not found at {} (set KILN_CORPUS to its path)",
        p.display()
    );
    p
}

fn dirs(p: PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

#[test]
fn buildkit_parser_dumps() {
    let mut failures = Vec::new();
    let cases = dirs(corpus().join("buildkit-parser/testfiles"));
    assert_eq!(cases.len(), 33);
    for case in &cases {
        let df = std::fs::read(case.join("Dockerfile")).unwrap();
        let want = std::fs::read_to_string(case.join("result")).unwrap();
        match parser::parse(&df) {
            Ok(ast) => {
                let got = ast.dump() + "\n";
                if got != want {
                    failures.push(format!(
                        "{}:\n--- got\n{got}--- want\n{want}",
                        case.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn buildkit_parser_negative() {
    for case in dirs(corpus().join("buildkit-parser/testfiles-negative")) {
        let df = std::fs::read(case.join("Dockerfile")).unwrap();
        assert!(
            parser::parse(&df).is_err(),
            "{} parsed but must fail",
            case.display()
        );
    }
}

#[test]
fn buildkit_parser_lines() {
    let df = std::fs::read(corpus().join("buildkit-parser/testfile-line/Dockerfile")).unwrap();
    let ast = parser::parse(&df).unwrap();
    assert_eq!((ast.start_line, ast.end_line), (5, 31));
    let got: Vec<(usize, usize)> = ast
        .children
        .iter()
        .map(|c| (c.start_line, c.end_line))
        .collect();
    assert_eq!(got, vec![(5, 5), (11, 12), (17, 31)]);
}

#[test]
fn heredoc_extract() {
    for dir in ["heredoc-extract", "heredoc-json-form"] {
        let base = corpus().join("buildkit-parser/extra").join(dir);
        let df = std::fs::read(base.join("Dockerfile")).unwrap();
        let ast = parser::parse(&df).unwrap();
        let want: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base.join("expected-heredocs.json")).unwrap())
                .unwrap();
        let entries = want["children"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("unexpected layout in {dir}"));
        for e in entries {
            let idx = e["child_index"].as_u64().unwrap() as usize;
            let node = &ast.children[idx];
            let node = match (&node.sub, node.keyword.as_str()) {
                (Some(s), "onbuild") => s.as_ref(),
                _ => node,
            };
            let docs = &e["heredocs"];
            if docs.is_null() {
                assert!(
                    node.heredocs.is_empty(),
                    "{dir} child {idx}: expected no heredocs, got {:?}",
                    node.heredocs
                );
                continue;
            }
            let docs = docs.as_array().unwrap();
            assert_eq!(
                docs.len(),
                node.heredocs.len(),
                "{dir} child {idx}: {:?}",
                node.heredocs
            );
            for (w, g) in docs.iter().zip(&node.heredocs) {
                assert_eq!(w["Name"].as_str().unwrap(), g.name, "{dir} child {idx}");
                assert_eq!(
                    w["Content"].as_str().unwrap(),
                    g.content,
                    "{dir} child {idx}"
                );
                assert_eq!(
                    w["Expand"].as_bool().unwrap(),
                    g.expand,
                    "{dir} child {idx} expand"
                );
                assert_eq!(
                    w["Chomp"].as_bool().unwrap(),
                    g.chomp,
                    "{dir} child {idx} chomp"
                );
                assert_eq!(
                    w["FileDescriptor"].as_u64().unwrap() as u32,
                    g.file_descriptor
                );
            }
        }
    }
}

#[test]
fn heredoc_words() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus().join("buildkit-parser/extra/heredoc-words.json")).unwrap(),
    )
    .unwrap();
    for w in v["valid_name_EOF"].as_array().unwrap() {
        let d = parser::parse_heredoc(w.as_str().unwrap())
            .unwrap()
            .unwrap_or_else(|| panic!("{w}"));
        assert_eq!(d.name, "EOF", "{w}");
    }
    for w in v["invalid_error"].as_array().unwrap() {
        assert!(parser::parse_heredoc(w.as_str().unwrap()).is_err(), "{w}");
    }
    for w in v["not_heredoc"].as_array().unwrap() {
        assert_eq!(
            parser::parse_heredoc(w.as_str().unwrap()).unwrap(),
            None,
            "{w}"
        );
    }
    for l in v["lines"].as_array().unwrap() {
        let docs = parser::heredocs_from_line(l["line"].as_str().unwrap()).unwrap();
        let names: Vec<String> = docs.into_iter().map(|d| d.name).collect();
        let want: Vec<String> = l["heredoc_names"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        assert_eq!(names, want, "{}", l["line"]);
    }
}

#[test]
fn parse_words_and_json_arrays() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus().join("buildkit-parser/extra/parse-words.json")).unwrap(),
    )
    .unwrap();
    for r in v.as_array().unwrap() {
        let input = r["input"].as_str().unwrap();
        let want: Vec<String> = r["expect"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().into())
            .collect();
        assert_eq!(parser::parse_words(input, '\\'), want, "{input}");
    }
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus().join("buildkit-parser/extra/json-arrays.json")).unwrap(),
    )
    .unwrap();
    for r in v["valid"].as_array().unwrap() {
        let input = r["input"].as_str().unwrap();
        let ast = parser::parse(format!("CMD {input}").as_bytes()).unwrap();
        let want: Vec<String> = r["expect"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().into())
            .collect();
        assert_eq!(ast.children[0].args, want, "{input}");
        assert!(ast.children[0].json);
    }
    for r in v["invalid_not_string_array"].as_array().unwrap() {
        let input = r.as_str().unwrap();
        assert!(
            parser::parse(format!("CMD {input}").as_bytes()).is_err(),
            "{input}"
        );
    }
}

#[test]
fn empty_continuation_warnings() {
    let base = corpus().join("buildkit-parser/extra/empty-continuation-warnings");
    let ast = parser::parse(&std::fs::read(base.join("Dockerfile")).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("expected-warnings.json")).unwrap())
            .unwrap();
    assert_eq!(
        ast.warnings.len() as u64,
        want["warning_count"].as_u64().unwrap()
    );
    for (w, subs) in ast
        .warnings
        .iter()
        .zip(want["warnings_short_contains"].as_array().unwrap())
    {
        for s in subs.as_array().unwrap() {
            assert!(
                w.short.contains(s.as_str().unwrap()),
                "{:?} lacks {s}",
                w.short
            );
        }
        assert!(w.detail.contains(want["detail_contains"].as_str().unwrap()));
    }
}

#[test]
fn go_quote_examples() {
    assert_eq!(go_quote("a\"b\\"), "\"a\\\"b\\\\\"");
    assert_eq!(go_quote("\u{0}\u{7f}\u{a0}♥"), "\"\\x00\\x7f\\u00a0♥\"");
}

fn dockerfiles(dir: PathBuf, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            dockerfiles(p, out);
        } else if p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("Dockerfile")
        {
            out.push(p);
        }
    }
}

#[test]
fn real_world_and_modern_parse() {
    for (dir, count) in [("real-world", 252), ("modern", 35)] {
        let mut files = Vec::new();
        dockerfiles(corpus().join(dir), &mut files);
        assert_eq!(files.len(), count, "{dir}");
        let mut failures = Vec::new();
        for f in &files {
            let data = std::fs::read(f).unwrap();
            match parser::parse(&data) {
                Ok(ast) => {
                    let again = parser::parse(&data).unwrap();
                    assert_eq!(ast.dump(), again.dump());
                }
                Err(e) => failures.push(format!("{}: {e}", f.display())),
            }
        }
        assert!(
            failures.is_empty(),
            "{dir}: {} failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

fn shell_env() -> Vec<(String, String)> {
    [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn shell_env_var_table() {
    let text = std::fs::read_to_string(corpus().join("buildkit-shell/envVarTest")).unwrap();
    let lex = Lex::new('\\');
    let env = shell_env();
    let mut n = 0;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(f.len(), 3, "{line}");
        if f[0] == "W" {
            continue;
        }
        n += 1;
        let got = lex.process_word(f[1], &env);
        if f[2] == "error" {
            assert!(got.is_err(), "{line}: got {got:?}");
        } else {
            assert_eq!(got.as_deref(), Ok(f[2]), "{line}");
        }
    }
    assert!(n > 200);
}

#[test]
fn shell_words_table() {
    let text = std::fs::read_to_string(corpus().join("buildkit-shell/wordsTest")).unwrap();
    let lex = Lex::new('\\');
    let mut env: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            let rest = rest.trim_start_matches(' ');
            let (k, v) = rest.split_once('=').unwrap();
            env.push((k.to_string(), v.to_string()));
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let (input, want) = line.split_once('|').unwrap();
        let want = want.trim_start_matches(' ');
        let got = lex.process_words(input.trim(), &env);
        if want == "error" {
            assert!(got.is_err(), "{line}");
        } else {
            let want: Vec<&str> = want.split(',').collect();
            assert_eq!(got.unwrap(), want, "{line}");
        }
    }
}

#[test]
fn shell_process_word_cases() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus().join("buildkit-shell/process-word-cases.json")).unwrap(),
    )
    .unwrap();
    let lex = Lex::new('\\');
    let to_env = |e: &serde_json::Value| -> Vec<(String, String)> {
        match e {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|kv| {
                    let s = kv.as_str().unwrap();
                    let (k, v) = s.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let set = |x: &serde_json::Value| -> std::collections::BTreeSet<String> {
        x.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    for c in v["process_with_matches"].as_array().unwrap() {
        let input = c["input"].as_str().unwrap();
        let got = lex.process(input, &to_env(&c["envs"]));
        if c["error"].as_bool().unwrap_or(false) {
            assert!(got.is_err(), "{input}: {got:?}");
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(got.result, c["expected"].as_str().unwrap(), "{input}");
        assert_eq!(got.matched, set(&c["matches"]), "{input} matches");
        assert_eq!(got.unmatched, set(&c["unmatched"]), "{input} unmatched");
    }
    for c in v["mandatory_env_vars"].as_array().unwrap() {
        let input = c["input"].as_str().unwrap();
        let got = lex.process_word(input, &to_env(&c["envs"]));
        match c["error_contains"].as_str() {
            Some(msg) if !msg.is_empty() => {
                let e = got.expect_err(input);
                assert!(e.to_string().contains(msg), "{input}: {e}");
            }
            _ => {
                if let Some(exp) = c["expected"].as_str() {
                    assert_eq!(got.unwrap(), exp, "{input}");
                }
            }
        }
    }
    for c in v["platform_release_name"].as_array().unwrap() {
        let input = c["input"].as_str().unwrap();
        let got = lex.process_word(input, &to_env(&c["envs"])).unwrap();
        assert_eq!(got, c["expected"].as_str().unwrap(), "{input}");
    }
}

/// Stands in for a registry: every image exists and is empty.
struct AnyImage;
impl kiln_dockerfile::ImageResolver for AnyImage {
    fn resolve(
        &self,
        reference: &str,
        p: &kiln_dockerfile::Platform,
    ) -> Result<(String, kiln_definition::image::Image), String> {
        Ok((
            reference.to_string(),
            kiln_definition::image::Image::empty(&p.os, &p.architecture, &p.variant),
        ))
    }
}

/// Corpus files that parse but that BuildKit itself refuses to convert, with
/// BuildKit's error. `synthetic/copy-flags` copies `--from` its own stage,
/// which dockerfile2llb reports as a cycle (TestDockerfileCircularDependencies).
const BUILDKIT_REJECTS: &[(&str, &str)] = &[(
    "synthetic/copy-flags.Dockerfile",
    "circular dependency detected on stage: deps",
)];

#[test]
fn real_world_and_modern_convert() {
    let mut failures = Vec::new();
    let mut n = 0;
    for dir in ["real-world", "modern"] {
        let mut files = Vec::new();
        dockerfiles(corpus().join(dir), &mut files);
        for f in &files {
            n += 1;
            let data = std::fs::read(f).unwrap();
            let opts = kiln_dockerfile::ConvertOptions::default();
            let name = f.file_name().unwrap().to_string_lossy();
            let expected_error = BUILDKIT_REJECTS
                .iter()
                .find(|(file, _)| f.ends_with(file))
                .map(|(_, e)| *e);
            match (
                kiln_dockerfile::convert(&data, &opts, &AnyImage),
                expected_error,
            ) {
                (Ok(_), None) => {}
                (Err(e), None) => failures.push(format!("{}: {e}", f.display())),
                (Err(e), Some(want)) if e.to_string().contains(want) => {
                    // It must still parse: only the conversion is refused.
                    kiln_dockerfile::parser::parse(&data)
                        .unwrap_or_else(|e| panic!("{name} must parse: {e}"));
                }
                (got, Some(want)) => failures.push(format!(
                    "{}: BuildKit fails with {want:?}, kiln gave {:?}",
                    f.display(),
                    got.err().map(|e| e.to_string())
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A deterministic stand-in for the cargo-fuzz targets in fuzz/ (which need
/// nightly): thousands of mutations of corpus files through the parser, the
/// converter and the expander. Any panic fails the test.
#[test]
fn mutated_corpus_never_panics() {
    let mut files = Vec::new();
    dockerfiles(corpus().join("modern"), &mut files);
    dockerfiles(corpus().join("buildkit-parser/testfiles"), &mut files);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let tokens: [&[u8]; 12] = [
        b"\\",
        b"$",
        b"${",
        b"}",
        b"<<EOF",
        b"\"",
        b"'",
        b"\n",
        b"--mount=",
        b"[",
        b"`",
        b"#",
    ];
    let lex = Lex::new('\\');
    let env = vec![("A".to_string(), "x".to_string())];
    let mut runs = 0;
    for f in files.iter().take(40) {
        let orig = std::fs::read(f).unwrap();
        for _ in 0..60 {
            let mut d = orig.clone();
            for _ in 0..(1 + next() % 4) {
                if d.is_empty() {
                    break;
                }
                let pos = (next() % d.len() as u64) as usize;
                match next() % 3 {
                    0 => d.truncate(pos),
                    1 => {
                        let t = tokens[(next() % tokens.len() as u64) as usize];
                        d.splice(pos..pos, t.iter().copied());
                    }
                    _ => d[pos] = (next() % 256) as u8,
                }
            }
            if let Ok(ast) = parser::parse(&d) {
                let _ = ast.dump();
                let _ = kiln_dockerfile::convert(
                    &d,
                    &kiln_dockerfile::ConvertOptions::default(),
                    &AnyImage,
                );
            }
            let text = String::from_utf8_lossy(&d);
            for line in text.lines().take(20) {
                let _ = lex.process(line, &env);
            }
            runs += 1;
        }
    }
    assert!(runs > 1000);
}

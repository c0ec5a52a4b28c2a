use super::*;

fn conv(df: &str) -> Result<Converted, FrontendError> {
    convert(df.as_bytes(), &ConvertOptions::default(), &NoImages)
}

struct AnyImageForTests;
impl ImageResolver for AnyImageForTests {
    fn resolve(&self, r: &str, p: &Platform) -> Result<(String, Image), String> {
        Ok((
            r.to_string(),
            Image::empty(&p.os, &p.architecture, &p.variant),
        ))
    }
}

#[test]
fn hostile_depths_are_errors_not_stack_overflows() {
    // 3,000 nested substitutions.
    let mut word = String::from("x");
    for _ in 0..3000 {
        word = format!("${{a:-{word}}}");
    }
    let e = conv(&format!("FROM scratch\nENV B={word}\n")).unwrap_err();
    assert!(e.to_string().contains("nested more than 64 deep"), "{e}");
    assert!(e.to_string().len() < 2000, "the error is bounded");
    // A chain of stages one past the limit, and one just inside it.
    let chain = |n: usize| {
        let mut df = String::from("FROM scratch AS s0\n");
        for i in 1..n {
            df.push_str(&format!("FROM s{} AS s{i}\n", i - 1));
        }
        df
    };
    let e = conv(&chain(MAX_STAGE_DEPTH + 1)).unwrap_err();
    assert!(e.to_string().contains("more than 1000 deep"), "{e}");
    conv(&chain(MAX_STAGE_DEPTH)).unwrap();
    let many = "FROM scratch\n".repeat(MAX_STAGES + 1);
    let e = conv(&many).unwrap_err();
    assert!(e.to_string().contains("more than 10000 stages"), "{e}");
}

#[test]
fn errors_about_huge_lines_stay_small() {
    let long = "x".repeat(1 << 20);
    let e = conv(&format!("FROM scratch\nRUN --bogus={long} true\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Dockerfile:2"), "{}", &e[..200]);
    assert!(e.len() < 6000, "{} bytes", e.len());
    let huge = vec![b'#'; MAX_DOCKERFILE_BYTES + 1];
    let e = convert(&huge, &ConvertOptions::default(), &NoImages).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
}

#[test]
fn config_instructions() {
    let c = conv(
        "FROM scratch\nENV A=1 B=$A\nENV C=${A}x\nLABEL l=v\nUSER 1000:1000\nEXPOSE 80 53/udp\nVOLUME /data\nSTOPSIGNAL SIGINT\nCMD [\"a\"]\nENTRYPOINT [\"e\"]\nHEALTHCHECK --interval=5s CMD true\n",
    )
    .unwrap();
    let cfg = &c.image.config;
    assert_eq!(
        cfg.env,
        vec![
            format!("PATH={}", kiln_definition::image::DEFAULT_PATH),
            "A=1".into(),
            "B=".into(),
            "C=1x".into()
        ]
    );
    assert_eq!(cfg.user, "1000:1000");
    assert!(cfg.exposed_ports.contains_key("80/tcp") && cfg.exposed_ports.contains_key("53/udp"));
    // ENTRYPOINT after CMD in the same stage keeps CMD.
    assert_eq!(cfg.cmd, Some(vec!["a".to_string()]));
    assert_eq!(cfg.healthcheck.as_ref().unwrap().interval, 5_000_000_000);
    assert_eq!(
        cfg.healthcheck.as_ref().unwrap().test,
        vec!["CMD-SHELL", "true"]
    );
    assert!(c.scratch);
}

#[test]
fn multi_stage_and_target() {
    let df = "FROM scratch AS a\nCOPY x /x\nFROM scratch AS b\nCOPY y /y\nFROM scratch\nCOPY --from=a /x /x\n";
    let c = conv(df).unwrap();
    let g = kiln_definition::Graph::from_definition(&c.definition).unwrap();
    // context, copy x (stage a), final copy: stage b is not needed.
    assert_eq!(g.vertices.len(), 3);
    let mut o = ConvertOptions {
        target: Some("b".into()),
        ..Default::default()
    };
    let c = convert(df.as_bytes(), &o, &NoImages).unwrap();
    assert_eq!(c.image.history.len(), 1);
    o.target = Some("nope".into());
    assert!(
        convert(df.as_bytes(), &o, &NoImages)
            .unwrap_err()
            .message
            .contains("could not be found")
    );
}

#[test]
fn errors_have_lines() {
    let e = conv("FROM scratch\nSTOPSIGNAL SIGNOPE\n").unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.to_string().contains("Dockerfile:2"));
    let e = conv("FROM scratch\nCOPPY a b\n").unwrap_err();
    assert!(e.message.contains("did you mean COPY"), "{e}");
    let e = conv("# syntax=example.com/frontend:1\nFROM scratch\n").unwrap_err();
    assert!(e.message.contains("unsupported syntax"));
    assert!(conv("# syntax=docker/dockerfile:1.7-labs\nFROM scratch\n").is_ok());
}

#[test]
fn errors_point_at_the_word() {
    let e = conv("FROM scratch\nCOPY --chmoud=755 a /b\n").unwrap_err();
    let text = e.to_string();
    assert!(text.contains("did you mean --chmod?"), "{text}");
    assert!(
        text.ends_with("    2 | COPY --chmoud=755 a /b\n      |      ^^^^^^^^"),
        "{text}"
    );
    let e = conv("FROM scratch\n  coppy a b\n").unwrap_err();
    assert!(e.to_string().ends_with("|   ^^^^^"), "{e}");
    let e = conv("FROM scratch\nRUN --mount=type=cache,targt=/x true\n").unwrap_err();
    assert!(e.message.contains("did you mean target?"), "{e}");
    assert_eq!(e.token.as_deref(), Some("targt"));
    let o = ConvertOptions {
        target: Some("buidl".into()),
        ..Default::default()
    };
    let e = convert(b"FROM scratch AS build\n", &o, &NoImages).unwrap_err();
    assert!(e.message.contains("did you mean build?"), "{e}");
}

#[test]
fn copy_from_needs_an_earlier_stage() {
    // Current BuildKit: --from and mount sources must be defined before.
    let df = "FROM scratch AS a\nCOPY --from=b /y /y\nFROM scratch AS b\nCOPY y /y\n";
    let o = ConvertOptions {
        target: Some("a".into()),
        ..Default::default()
    };
    let e = convert(df.as_bytes(), &o, &NoImages).unwrap_err();
    assert!(
        e.message.contains(
            "cannot copy from stage \"b\", it needs to be defined before current stage \"a\""
        ),
        "{e}"
    );
    let e = conv("FROM scratch AS s0\nCOPY --from=s0 /a /b\n").unwrap_err();
    assert!(
        e.message
            .contains("circular dependency detected on stage: s0"),
        "{e}"
    );
    let e =
        conv("FROM scratch AS a\nRUN --mount=from=b,target=/x true\nFROM scratch AS b\nFROM a\n")
            .unwrap_err();
    assert!(e.message.contains("needs to be defined before"), "{e}");
    let e = conv("FROM scratch\nCOPY --from=3 /a /b\n").unwrap_err();
    assert!(e.message.contains("invalid stage index 3"), "{e}");
    // An earlier stage by name (any case) or index is fine.
    assert!(
        conv("FROM scratch AS One\nFROM scratch\nCOPY --from=ONE /a /b\nCOPY --from=0 /a /c\n")
            .is_ok()
    );
    // FROM only sees stages above it: a later name is an image.
    let o = ConvertOptions {
        target: Some("a".into()),
        ..Default::default()
    };
    let e = convert(b"FROM b AS a\nFROM scratch AS b\n", &o, &NoImages).unwrap_err();
    assert!(e.message.contains("b"), "the image b is resolved: {e}");
    // A duplicate name is allowed; the later stage wins.
    let c = conv("FROM scratch AS d\nFROM scratch AS d\nLABEL x=2\nFROM d\n").unwrap();
    assert_eq!(
        c.image.config.labels.get("x").map(String::as_str),
        Some("2")
    );
    assert!(c.warnings.iter().any(|w| w.rule == "DuplicateStageName"));
}

#[test]
fn git_refs() {
    let g = parse_git_ref("https://github.com/moby/buildkit.git#v0.10.1:docs").unwrap();
    assert_eq!(
        (g.remote.as_str(), g.reference.as_str(), g.subdir.as_str()),
        ("https://github.com/moby/buildkit.git", "v0.10.1", "docs")
    );
    let g = parse_git_ref("git@github.com:moby/buildkit.git#main").unwrap();
    assert_eq!(
        (g.remote.as_str(), g.reference.as_str()),
        ("git@github.com:moby/buildkit.git", "main")
    );
    let g = parse_git_ref("github.com/moby/buildkit").unwrap();
    assert_eq!(g.remote, "https://github.com/moby/buildkit");
    let g = parse_git_ref("git://127.0.0.1:9418/r.git?ref=v1&subdir=a/b").unwrap();
    assert_eq!((g.reference.as_str(), g.subdir.as_str()), ("v1", "a/b"));
    // Plain downloads stay downloads.
    assert!(parse_git_ref("https://example.com/file.tar.gz").is_none());
    assert!(parse_git_ref("./local.git").is_none());
    // The graph has a git source whose copy takes the whole checkout.
    let c = conv("FROM scratch\nADD git://h/r.git#v1:sub /src\n").unwrap();
    let g = kiln_definition::Graph::from_definition(&c.definition).unwrap();
    let src = g
        .vertices
        .values()
        .find_map(|v| match &v.op.op {
            Some(pb::op::Op::Source(s)) if s.identifier.starts_with("git:") => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(src.identifier, "git:git://h/r.git");
    assert!(src.attrs.iter().any(|a| a.key == "ref" && a.value == "v1"));
    assert!(
        src.attrs
            .iter()
            .any(|a| a.key == "subdir" && a.value == "sub")
    );
    assert!(conv("FROM scratch\nADD --checksum=sha256:00 git://h/r.git#main /src\n").is_err());
    let sha = "a".repeat(40);
    assert!(
        conv(&format!(
            "FROM scratch\nADD --checksum={sha} git://h/r.git#main /src\n"
        ))
        .is_ok()
    );
}

#[test]
fn context_paths_are_what_the_build_reads() {
    let c = conv("FROM scratch\nCOPY src/ /app/\nCOPY ./a/../cfg.txt /\nADD pkgs/*/x.json /p/\nCOPY <<EOF /h\nhi\nEOF\n").unwrap();
    assert_eq!(
        c.context_paths,
        Some(vec!["cfg.txt".into(), "pkgs".into(), "src".into()])
    );
    // Anything that reads the context root needs all of it.
    for df in [
        "FROM scratch\nCOPY . /app\n",
        "FROM scratch\nCOPY *.txt /\n",
        "FROM busybox\nRUN --mount=type=bind,target=/src true\n",
    ] {
        let o = ConvertOptions::default();
        let c = convert(df.as_bytes(), &o, &AnyImageForTests).unwrap();
        assert_eq!(c.context_paths, None, "{df}");
    }
}

#[test]
fn unnamed_ssh_sockets_are_numbered() {
    let c = convert(
        b"FROM busybox\nRUN --mount=type=ssh --mount=type=ssh,id=b --mount=type=ssh,id=c,target=/s true\n",
        &ConvertOptions::default(),
        &AnyImageForTests,
    )
    .unwrap();
    let g = kiln_definition::Graph::from_definition(&c.definition).unwrap();
    let mut targets: Vec<String> = g
        .vertices
        .values()
        .filter_map(|v| match &v.op.op {
            Some(pb::op::Op::Exec(e)) => Some(e.mounts.clone()),
            _ => None,
        })
        .flatten()
        .filter(|m| m.r#type == pb::MountType::Ssh as i32)
        .map(|m| m.dest)
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            "/run/buildkit/ssh_agent.0",
            "/run/buildkit/ssh_agent.1",
            "/s"
        ]
    );
}

#[test]
fn build_checks() {
    let c = conv("FROM scratch AS Base\nENV A b\nEXPOSE 80/TCP 127.0.0.1:8080:80\nENV B=$NOPE\nMAINTAINER me\n").unwrap();
    let rules: Vec<&str> = c.warnings.iter().map(|w| w.rule.as_str()).collect();
    for r in [
        "StageNameCasing",
        "LegacyKeyValueFormat",
        "ExposeProtoCasing",
        "ExposeInvalidFormat",
        "UndefinedVar",
        "MaintainerDeprecated",
    ] {
        assert!(rules.contains(&r), "{r} missing from {rules:?}");
    }
    let c = conv("ARG TAG\nFROM scratch${TAG}\n").unwrap();
    assert!(c.warnings.iter().all(|w| w.rule != "UndefinedArgInFrom"));
    let c = conv("FROM scratch${UNDECLARED}\n").unwrap();
    assert!(c.warnings.iter().any(|w| w.rule == "UndefinedArgInFrom"));
    // The check directive skips rules, or turns warnings into errors.
    let c = conv("# check=skip=LegacyKeyValueFormat\nFROM scratch\nENV A b\n").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let e = conv("# check=error=true\nFROM scratch\nENV A b\n").unwrap_err();
    assert!(
        e.message.contains("LegacyKeyValueFormat") && e.line == 3,
        "{e}"
    );
}

#[test]
fn args_scope() {
    let df = "ARG V=1\nFROM scratch\nARG V\nENV X=$V\nARG W=2\nENV Y=$W\n";
    let c = conv(df).unwrap();
    assert!(c.image.config.env.contains(&"X=1".to_string()));
    assert!(c.image.config.env.contains(&"Y=2".to_string()));
    let o = ConvertOptions {
        build_args: [("W".to_string(), "9".to_string())].into_iter().collect(),
        ..Default::default()
    };
    let c = convert(df.as_bytes(), &o, &NoImages).unwrap();
    assert!(c.image.config.env.contains(&"Y=9".to_string()));
}

#[test]
fn image_references_follow_dockers_grammar() {
    for ok in [
        "busybox",
        "parity-base:1",
        "docker.io/library/alpine:3.18",
        "127.0.0.1:5000/bench/k-1:latest",
        "localhost:5000/a/b_c__d-e.f",
        "Example.COM/x/y:v1.0-rc_1",
        "a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        assert!(valid_image_reference(ok), "{ok}");
    }
    for bad in [
        "Bad/Ref:Tag",
        "Bad/ref",
        "a/B",
        "a:",
        ":x",
        "a//b",
        "-a",
        "a b",
        "",
    ] {
        assert!(!valid_image_reference(bad), "{bad}");
    }
}

#[test]
fn every_stage_is_checked_even_unused_ones() {
    let o = ConvertOptions {
        target: Some("ok".into()),
        ..Default::default()
    };
    let e = convert(
        b"FROM scratch AS ok\nFROM scratch AS unused\nCOPY --bogus=1 a b\n",
        &o,
        &NoImages,
    )
    .unwrap_err();
    assert!(e.message.contains("unknown flag: --bogus"), "{e}");
    let e = convert(
        b"ARG IMG=Bad/Ref\nFROM scratch AS ok\nFROM ${IMG} AS unused\n",
        &o,
        &NoImages,
    )
    .unwrap_err();
    assert!(e.message.contains("invalid reference format"), "{e}");
    // A global ARG without a value hides the automatic TARGETOS.
    let c = conv("ARG TARGETOS\nFROM scratch\nARG TARGETOS\nENV T=${TARGETOS:-unset}\n").unwrap();
    assert!(
        c.image.config.env.contains(&"T=unset".to_string()),
        "{:?}",
        c.image.config.env
    );
}

#[test]
fn sbom_scan_switches_pick_built_stages_as_buildkit() {
    // BuildKit's own case (dockerfile_sbom_test.go): base2 is never built,
    // the target is the core scan, not an extra.
    let df = "ARG BUILDKIT_SBOM_SCAN_CONTEXT=true\nFROM scratch as file\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY <<EOF /file\ndata\nEOF\nFROM scratch as base\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY --from=file /file /foo\nFROM scratch as base2\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY --from=file /file /bar\nFROM base\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nRUN env\n";
    let c = conv(df).unwrap();
    let names: Vec<&str> = c.sbom_stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["file", "base"]);
    assert!(c.sbom_context);
    // The switches are not variables of the build.
    let graph = kiln_definition::Graph::from_definition(&c.definition).unwrap();
    let run = graph
        .vertices
        .values()
        .find_map(|v| match &v.op.op {
            Some(pb::op::Op::Exec(e)) => e.meta.clone(),
            _ => None,
        })
        .unwrap();
    assert!(
        !run.env.iter().any(|e| e.starts_with("BUILDKIT_SBOM")),
        "{:?}",
        run.env
    );
    // A build arg turns it off where the ARG is declared; a list names stages.
    let mut opts = ConvertOptions::default();
    opts.build_args
        .insert("BUILDKIT_SBOM_SCAN_STAGE".into(), "false".into());
    let c = convert(df.as_bytes(), &opts, &NoImages).unwrap();
    assert!(c.sbom_stages.is_empty());
    opts.build_args
        .insert("BUILDKIT_SBOM_SCAN_STAGE".into(), "base".into());
    let c = convert(df.as_bytes(), &opts, &NoImages).unwrap();
    let names: Vec<&str> = c.sbom_stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["base"]);
    // Undeclared, a build arg changes nothing.
    let c = convert(
        b"FROM scratch AS a\nCOPY x /x\nFROM scratch\nCOPY --from=a /x /y\n",
        &opts,
        &NoImages,
    )
    .unwrap();
    assert!(c.sbom_stages.is_empty() && !c.sbom_context);
}

fn rules(df: &str) -> Vec<(String, usize, String)> {
    let c = convert(df.as_bytes(), &ConvertOptions::default(), &AnyImageForTests).unwrap();
    c.warnings
        .into_iter()
        .map(|w| (w.rule, w.line, w.message))
        .collect()
}

fn has(rules: &[(String, usize, String)], rule: &str, line: usize, message: &str) -> bool {
    rules
        .iter()
        .any(|(r, l, m)| r == rule && *l == line && m == message)
}

#[test]
fn buildkit_rules_kiln_lacked() {
    // ConsistentInstructionCasing: the majority is upper case.
    let r = rules("FROM scratch\nCOPY a /a\ncopy b /b\nCmd [\"x\"]\n");
    assert!(
        has(
            &r,
            "ConsistentInstructionCasing",
            3,
            "Command 'copy' should match the case of the command majority (uppercase)"
        ),
        "{r:?}"
    );
    assert!(
        has(
            &r,
            "ConsistentInstructionCasing",
            4,
            "Command 'Cmd' should match the case of the command majority (uppercase)"
        ),
        "{r:?}"
    );
    assert!(!r.iter().any(|(_, l, _)| *l == 2));
    // ReservedStageName.
    let r = rules("FROM scratch AS context\nFROM scratch\n");
    assert!(
        has(
            &r,
            "ReservedStageName",
            1,
            "Stage name should not use the same name as reserved stage \"context\""
        ),
        "{r:?}"
    );
    // MultipleInstructionsDisallowed: the overridden one is reported.
    let r = rules("FROM scratch\nCMD [\"a\"]\nENTRYPOINT [\"e\"]\nCMD [\"b\"]\n");
    assert!(
        has(
            &r,
            "MultipleInstructionsDisallowed",
            2,
            "Multiple CMD instructions should not be used in the same stage because only the last one will be used"
        ),
        "{r:?}"
    );
    assert!(
        !r.iter()
            .any(|(x, l, _)| x == "MultipleInstructionsDisallowed" && *l == 4)
    );
    // RedundantTargetPlatform and FromPlatformFlagConstDisallowed.
    let r = rules("FROM --platform=$TARGETPLATFORM scratch\n");
    assert!(
        has(
            &r,
            "RedundantTargetPlatform",
            1,
            "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior"
        ),
        "{r:?}"
    );
    let r = rules("FROM --platform=linux/arm64 scratch AS build\n");
    assert!(
        has(
            &r,
            "FromPlatformFlagConstDisallowed",
            1,
            "FROM --platform flag should not use constant value \"linux/arm64\""
        ),
        "{r:?}"
    );
    let r = rules("FROM --platform=linux/arm64 scratch AS build-arm64\n");
    assert!(
        !r.iter()
            .any(|(x, _, _)| x == "FromPlatformFlagConstDisallowed"),
        "{r:?}"
    );
    let r = rules("FROM --platform=$BUILDPLATFORM scratch\n");
    assert!(r.is_empty(), "{r:?}");
    // SecretsUsedInArgOrEnv for ENV, as for ARG.
    let r = rules("FROM scratch\nENV DB_PASSWORD=hunter2\n");
    assert!(
        has(
            &r,
            "SecretsUsedInArgOrEnv",
            2,
            "Do not use ARG or ENV instructions for sensitive data (ENV \"DB_PASSWORD\")"
        ),
        "{r:?}"
    );
}

#[test]
fn copy_ignored_file_as_buildkit() {
    let mut opts = ConvertOptions {
        dockerignore: vec!["secret.txt".into(), "build/".into()],
        ..Default::default()
    };
    let df =
        b"FROM scratch\nCOPY secret.txt /s\nADD build/out.bin /o\nCOPY ok.txt /ok\nCOPY . /all\n";
    let c = convert(df, &opts, &NoImages).unwrap();
    let w: Vec<(usize, String)> = c
        .warnings
        .iter()
        .filter(|w| w.rule == "CopyIgnoredFile")
        .map(|w| (w.line, w.message.clone()))
        .collect();
    assert_eq!(
        w,
        [
            (
                2,
                "Attempting to Copy file \"secret.txt\" that is excluded by .dockerignore"
                    .to_string()
            ),
            (
                3,
                "Attempting to Add file \"build/out.bin\" that is excluded by .dockerignore"
                    .to_string()
            ),
        ]
    );
    // Exclusions (!) make it undecidable: BuildKit then says nothing.
    opts.dockerignore.push("!build/keep".into());
    let c = convert(df, &opts, &NoImages).unwrap();
    assert!(c.warnings.iter().all(|w| w.rule != "CopyIgnoredFile"));
}

struct ArmOnly;
impl ImageResolver for ArmOnly {
    fn resolve(&self, r: &str, _: &Platform) -> Result<(String, Image), String> {
        Ok((r.to_string(), Image::empty("linux", "arm64", "")))
    }
}

#[test]
fn invalid_base_image_platform_and_definition_descriptions() {
    let opts = ConvertOptions {
        target_platform: Platform::parse("linux/amd64").unwrap(),
        ..Default::default()
    };
    let c = convert(b"FROM example.com/only-arm:1\n", &opts, &ArmOnly).unwrap();
    assert!(
        c.warnings.iter().any(|w| w.rule == "InvalidBaseImagePlatform"
            && w.message
                == "Base image example.com/only-arm:1 was pulled with platform \"linux/arm64\", expected \"linux/amd64\" for current build"),
        "{:?}",
        c.warnings
    );
    // Experimental: reported only when the directive asks for it.
    let df = "# check=experimental=InvalidDefinitionDescription\n# the toolchain\nARG GO=1\n# base the first stage\nFROM scratch AS base\n# builds it\nFROM base AS build\n";
    let w: Vec<(usize, String)> = conv(df)
        .unwrap()
        .warnings
        .into_iter()
        .filter(|w| w.rule == "InvalidDefinitionDescription")
        .map(|w| (w.line, w.message))
        .collect();
    assert_eq!(
        w,
        [
            (
                3,
                "Comment for ARG should follow the format: `# GO <description>`".to_string()
            ),
            (
                7,
                "Comment for FROM should follow the format: `# build <description>`".to_string()
            ),
        ]
    );
    let plain = df.replacen("# check=experimental=InvalidDefinitionDescription\n", "", 1);
    assert!(
        conv(&plain)
            .unwrap()
            .warnings
            .iter()
            .all(|w| w.rule != "InvalidDefinitionDescription")
    );
}

#[test]
fn expansions_that_multiply_are_bounded() {
    let seed = "a".repeat(1000);
    // Each line ten times the last: past 1 MiB on the fourth.
    let mut df = format!("FROM scratch\nENV A={seed}\n");
    for _ in 0..6 {
        df.push_str(&format!("ENV A={}\n", "$A".repeat(10)));
    }
    let e = conv(&df).unwrap_err();
    assert!(e.to_string().contains("longer than 1 MiB"), "{e}");
    assert_eq!(e.line, 6, "{e}");
    // `${A//?/$A}` squares A: 2,000 characters would make 4 MB.
    let e = conv(&format!(
        "FROM scratch\nARG A={}\nENV B=${{A//?/$A}}\n",
        "b".repeat(2000)
    ))
    .unwrap_err();
    assert!(e.to_string().contains("longer than 1 MiB"), "{e}");
    // Quoted, the same.
    let e = conv(&format!(
        "FROM scratch\nENV A={seed}\nENV A=\"{}\"\nENV A=\"{}\"\nENV A=\"{}\"\nENV A=\"{}\"\n",
        "$A".repeat(10),
        "$A".repeat(10),
        "$A".repeat(10),
        "$A".repeat(10)
    ))
    .unwrap_err();
    assert!(e.to_string().contains("longer than 1 MiB"), "{e}");
}

#[test]
fn a_stage_environment_and_the_graph_are_bounded() {
    // Words under 1 MiB each (60 KiB lines, expanded), many of them: the
    // environment stops at 4 MiB.
    let big = |df: &mut String| {
        df.push_str(&format!("ENV S={}\n", "c".repeat(60 << 10)));
        df.push_str(&format!("ENV A0={}\n", "$S".repeat(15)));
    };
    let mut df = String::from("FROM scratch\n");
    big(&mut df);
    for i in 1..8 {
        df.push_str(&format!("ENV A{i}=$A0\n"));
    }
    let e = conv(&df).unwrap_err();
    assert!(e.to_string().contains("environment grew past 4 MiB"), "{e}");
    // 3.6 MiB of environment carried by each RUN: the graph stops at 256 MiB.
    let mut df = String::from("FROM scratch\n");
    big(&mut df);
    for i in 1..4 {
        df.push_str(&format!("ENV A{i}=$A0\n"));
    }
    for i in 0..100 {
        df.push_str(&format!("RUN echo {i}\n"));
    }
    let e = conv(&df).unwrap_err();
    assert!(e.to_string().contains("graph grew past 256 MiB"), "{e}");
}

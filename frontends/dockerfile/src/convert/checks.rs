//! Build checks (lint rules) run while converting.

use super::*;

impl Ctx<'_> {
    /// Lint rules that look at one instruction without running anything.
    pub(super) fn check_instruction(&mut self, st: &StageState, node: &Node) {
        let line = node.start_line;
        let kw = node.keyword.as_str();
        if (kw == "env" || kw == "label") && node.args.len() == 3 && node.args[2].is_empty() {
            let up = kw.to_uppercase();
            self.warn(
                "LegacyKeyValueFormat",
                &format!(
                    "\"{up} key=value\" should be used instead of legacy \"{up} key value\" format"
                ),
                line,
            );
        }
        if kw == "expose" {
            for a in &node.args {
                if let Some((_, proto)) = a.split_once('/')
                    && proto != proto.to_lowercase()
                {
                    self.warn(
                        "ExposeProtoCasing",
                        &format!(
                            "Defined protocol '{a}' in EXPOSE instruction should be lowercase"
                        ),
                        line,
                    );
                }
                if a.contains(':') {
                    self.warn("ExposeInvalidFormat", &format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{a}'"), line);
                }
            }
        }
        // Variables the builder expands itself that nothing defines.
        let expands = matches!(
            kw,
            "env"
                | "label"
                | "workdir"
                | "user"
                | "expose"
                | "volume"
                | "stopsignal"
                | "copy"
                | "add"
        );
        if expands {
            let env = st.expansion_env();
            let declared: Vec<&String> = st.args.iter().map(|(k, _)| k).collect();
            let texts: Vec<&String> = if kw == "env" || kw == "label" {
                node.args.chunks(3).filter_map(|c| c.get(1)).collect()
            } else {
                node.args.iter().collect()
            };
            for t in texts {
                if let Ok(x) = self.lex.process(t, &env) {
                    for name in x.unmatched {
                        if !declared.contains(&&name) && !PROXY_ARGS.contains(&name.as_str()) {
                            self.warn(
                                "UndefinedVar",
                                &format!("Usage of undefined variable '${name}'"),
                                line,
                            );
                        }
                    }
                }
            }
        }
    }

    pub(super) fn warn(&mut self, rule: &str, message: &str, line: usize) {
        self.warnings.push(BuildWarning {
            rule: rule.into(),
            message: message.into(),
            line,
        });
    }
}

impl Ctx<'_> {
    /// CopyIgnoredFile: a COPY/ADD source from the main context that
    /// .dockerignore excludes (it or a parent directory).
    pub(super) fn check_ignored_source(&mut self, src: &str, add: bool, line: usize) {
        let Some(m) = &self.ignore else {
            return;
        };
        let clean = kiln_context::dockerignore::clean(src);
        let clean = clean.trim_start_matches('/').to_string();
        if clean.is_empty() || clean == "." {
            return;
        }
        let mut prefix = String::new();
        let mut matched = false;
        for comp in clean.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(comp);
            if m.matches(&prefix) {
                matched = true;
                break;
            }
        }
        if matched {
            let cmd = if add { "Add" } else { "Copy" };
            self.warn(
                "CopyIgnoredFile",
                &format!("Attempting to {cmd} file {clean:?} that is excluded by .dockerignore"),
                line,
            );
        }
    }

    /// InvalidDefinitionDescription (experimental in BuildKit: reported only
    /// when `# check=experimental=...` enables it): a comment right above
    /// `FROM ... AS name` or `ARG name` should start with that name.
    pub(super) fn check_descriptions(&mut self, top: &[Node]) {
        let mut found = Vec::new();
        for n in top {
            let keys: Vec<String> = match n.keyword.as_str() {
                "arg" => n
                    .args
                    .iter()
                    .map(|a| a.split('=').next().unwrap_or(a).to_string())
                    .collect(),
                "from" => match n.args.as_slice() {
                    [_, kw, name] if kw.eq_ignore_ascii_case("as") => vec![name.clone()],
                    _ => continue,
                },
                _ => continue,
            };
            let Some(last) = n.comments.last() else {
                continue;
            };
            let first = last
                .trim_start_matches('#')
                .trim()
                .split(' ')
                .next()
                .unwrap_or("");
            if keys.is_empty() || keys.iter().any(|k| k == first) {
                continue;
            }
            let example = if keys.len() > 1 {
                "<arg_key>".to_string()
            } else {
                keys[0].clone()
            };
            found.push((n.keyword.to_uppercase(), example, n.start_line));
        }
        for (instruction, key, line) in found {
            self.warn(
                "InvalidDefinitionDescription",
                &format!(
                    "Comment for {instruction} should follow the format: `# {key} <description>`"
                ),
                line,
            );
        }
    }

    /// The rules BuildKit checks over the whole Dockerfile, every stage
    /// whether built or not: one casing for instructions, no reserved stage
    /// names, no CMD/ENTRYPOINT/HEALTHCHECK that a later one overrides, and
    /// FROM --platform values that say something.
    pub(super) fn check_whole_file(&mut self) {
        // The keyword as written (the parser keeps it lower-cased).
        let written = |n: &Node| {
            n.original
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let consistent = |w: &str| w == w.to_lowercase() || w == w.to_uppercase();
        let mut nodes: Vec<(String, usize)> = Vec::new();
        for st in &self.stages {
            nodes.push((written(&st.from_node), st.from_node.start_line));
            for c in &st.commands {
                nodes.push((written(c), c.start_line));
            }
        }
        let lower = nodes
            .iter()
            .filter(|(w, _)| consistent(w) && *w == w.to_lowercase())
            .count();
        let upper = nodes
            .iter()
            .filter(|(w, _)| consistent(w) && *w != w.to_lowercase())
            .count();
        let majority_lower = lower > upper;
        for (w, line) in nodes {
            let casing = if majority_lower && w != w.to_lowercase() {
                "lowercase"
            } else if !majority_lower && w != w.to_uppercase() {
                "uppercase"
            } else {
                continue;
            };
            self.warn(
                "ConsistentInstructionCasing",
                &format!("Command '{w}' should match the case of the command majority ({casing})"),
                line,
            );
        }
        let meta = self.meta_env();
        for idx in 0..self.stages.len() {
            let stage = &self.stages[idx];
            let (name, from_line) = (stage.name.clone(), stage.from_node.start_line);
            if let Some(n) = name
                .as_deref()
                .filter(|n| matches!(*n, "scratch" | "context"))
            {
                self.warn(
                    "ReservedStageName",
                    &format!("Stage name should not use the same name as reserved stage {n:?}"),
                    from_line,
                );
            }
            // Only the last of these counts: the earlier ones are reported.
            let mut last: HashMap<String, usize> = HashMap::new();
            let mut repeated = Vec::new();
            for c in &self.stages[idx].commands {
                if matches!(c.keyword.as_str(), "cmd" | "entrypoint" | "healthcheck")
                    && let Some(prev) = last.insert(c.keyword.clone(), c.start_line)
                {
                    repeated.push((written(c), prev));
                }
            }
            for (w, prev) in repeated {
                self.warn(
                    "MultipleInstructionsDisallowed",
                    &format!("Multiple {} instructions should not be used in the same stage because only the last one will be used", w.to_uppercase()),
                    prev,
                );
            }
            let Some(flag) = self.stages[idx].platform.clone() else {
                continue;
            };
            let Ok(x) = self.lex.process(&flag, &meta) else {
                continue;
            };
            if x.matched.len() == 1 && x.unmatched.is_empty() {
                let target = meta
                    .iter()
                    .rev()
                    .find(|(k, _)| k == "TARGETPLATFORM")
                    .map(|(_, v)| v.clone());
                if x.matched.iter().any(|m| m == "TARGETPLATFORM")
                    && target.as_deref() == Some(x.result.as_str())
                {
                    self.warn(
                        "RedundantTargetPlatform",
                        &format!("Setting platform to predefined {flag} in FROM is redundant as this is the default behavior"),
                        from_line,
                    );
                }
            } else if x.matched.is_empty()
                && x.unmatched.is_empty()
                && let Some(p) = Platform::parse(&x.result)
            {
                // A stage named for its platform (build-arm64) may pin it.
                let stage_name = name.unwrap_or_default();
                if !stage_name.contains(&p.os) && !stage_name.contains(&p.architecture) {
                    self.warn(
                        "FromPlatformFlagConstDisallowed",
                        &format!(
                            "FROM --platform flag should not use constant value {:?}",
                            x.result
                        ),
                        from_line,
                    );
                }
            }
        }
    }
}

pub(super) fn is_secret_name(name: &str) -> bool {
    let l = name.to_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "access_key",
    ]
    .iter()
    .any(|s| l.contains(s))
}

//! One stage: its base (image, stage, named context or scratch) and its instructions.

use super::*;

impl Ctx<'_> {
    pub(super) fn convert_stage(&mut self, idx: usize) -> Result<StageResult, FrontendError> {
        if let Some(r) = self.done.get(&idx) {
            return Ok(r.clone());
        }
        let from_line = self.stages[idx].from_node.start_line;
        // A stage converts the stages it uses first, recursively: the
        // Dockerfile decides how deep, so the depth is bounded.
        if self.in_progress.len() >= MAX_STAGE_DEPTH {
            return Err(self.err(
                from_line,
                format!(
                    "stages depend on each other more than {MAX_STAGE_DEPTH} deep (FROM, COPY --from and RUN --mount from= chains)"
                ),
            ));
        }
        if !self.in_progress.insert(idx) {
            let name = self.stages[idx]
                .name
                .clone()
                .unwrap_or_else(|| format!("stage-{idx}"));
            return Err(self.err(
                from_line,
                format!("circular dependency detected on stage: {name}"),
            ));
        }
        let meta = self.meta_env();
        let expansion = self
            .lex
            .process(&self.stages[idx].base, &meta)
            .map_err(|e| self.err(from_line, e.to_string()))?;
        for name in &expansion.unmatched {
            if !self.meta_args.iter().any(|(k, _)| k == name) {
                self.warn(
                    "UndefinedArgInFrom",
                    &format!("FROM argument '{name}' is not declared"),
                    from_line,
                );
            }
        }
        if expansion.unmatched.is_empty()
            && expansion
                .matched
                .iter()
                .any(|n| self.meta_args.iter().any(|(k, _)| k == n))
        {
            // With defaults only (no build args), is the name still valid?
            let defaults: Vec<(String, String)> = self
                .builtin_args()
                .into_iter()
                .chain(
                    self.meta_args
                        .iter()
                        .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v))),
                )
                .collect();
            let plain = self
                .lex
                .process_word(&self.stages[idx].base, &defaults)
                .unwrap_or_default();
            if plain.is_empty()
                || plain.ends_with(':')
                || plain.starts_with(':')
                || plain.contains("::")
            {
                self.warn(
                    "InvalidDefaultArgInFrom",
                    &format!(
                        "Default value for ARG {} results in empty or invalid base image name",
                        self.stages[idx].base
                    ),
                    from_line,
                );
            }
        }
        let base = expansion.result;
        let platform = match &self.stages[idx].platform {
            Some(p) => {
                let p = self
                    .lex
                    .process_word(p, &meta)
                    .map_err(|e| self.err(from_line, e.to_string()))?;
                Platform::parse(&p)
                    .ok_or_else(|| self.err(from_line, format!("invalid platform {p:?}")))?
            }
            None => self.opts.target_platform.clone(),
        };
        // A named build context replaces the name (a stage or an image), as in BuildKit.
        let named = self.named_context(&base);
        let base = match &named {
            Some(Err(image)) => image.clone(),
            _ => base,
        };
        // The FROM step of an image base (renamed with its label below).
        let mut from_image: Option<(OutputRef, String)> = None;
        let mut result = if let Some(Ok(local)) = named {
            // A directory as a base: its files become the root filesystem.
            let src = self.local_source(&local);
            let copy = pb::FileAction {
                action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                    source_input: 0,
                    src: vec!["/".into()],
                    dest: "/".into(),
                    dir_copy_contents: true,
                    follow_symlinks: true,
                    create_dest_path: true,
                    timestamp: -1,
                    ..Default::default()
                })),
            };
            let node = self.stages[idx].from_node.clone();
            let state = self.file_op(
                None,
                vec![src],
                vec![copy],
                &format!("[context {local}] FROM {}", self.stages[idx].base),
                &node,
                &platform,
            );
            StageResult {
                state: Some(state),
                image: Image::empty(&platform.os, &platform.architecture, &platform.variant),
                run_env: Default::default(),
            }
        } else if base == "scratch" {
            StageResult {
                state: None,
                image: Image::empty(&platform.os, &platform.architecture, &platform.variant),
                run_env: Default::default(),
            }
        } else if let Some(dep) = self
            .stage_named_exactly(&base, idx)
            .filter(|_| named.is_none())
        {
            self.convert_stage(dep)?
        } else {
            let (pinned, image) = self
                .images
                .resolve(&base, &platform)
                .map_err(|e| self.err(from_line, e))?;
            // A single-platform image of another platform is used, with a
            // warning, as in BuildKit.
            if !image.architecture.is_empty()
                && (image.os != platform.os || image.architecture != platform.architecture)
            {
                let actual = if image.variant.is_empty() {
                    format!("{}/{}", image.os, image.architecture)
                } else {
                    format!("{}/{}/{}", image.os, image.architecture, image.variant)
                };
                self.warn(
                    "InvalidBaseImagePlatform",
                    &format!(
                        "Base image {base} was pulled with platform {actual:?}, expected {:?} for current build",
                        platform.format()
                    ),
                    from_line,
                );
            }
            let loc = self.loc(&self.stages[idx].from_node);
            let r = self.image_source_op(&pinned, &platform, &loc);
            from_image = Some((r.clone(), pinned.clone()));
            StageResult {
                state: Some(r),
                image,
                run_env: Default::default(),
            }
        };
        // As BuildKit: the config always has a PATH, and the image's ENV is
        // set again over what a base stage's ARGs left in the environment.
        if !result
            .image
            .config
            .env
            .iter()
            .any(|e| e.starts_with("PATH="))
        {
            result
                .image
                .config
                .env
                .push(format!("PATH={}", kiln_definition::image::DEFAULT_PATH));
        }
        for e in result.image.config.env.clone() {
            let (k, v) = e.split_once('=').unwrap_or((&e, ""));
            add_or_replace(&mut result.run_env, k, v).map_err(|e| self.err(from_line, e))?;
        }
        // ONBUILD triggers of the base run first, then are cleared.
        let mut commands = Vec::new();
        for trigger in std::mem::take(&mut result.image.config.on_build) {
            let node = parser::node_from_line(&trigger, '\\')
                .map_err(|e| self.err(from_line, format!("ONBUILD trigger {trigger:?}: {e}")))?;
            commands.push(Node {
                start_line: from_line,
                end_line: from_line,
                ..node
            });
        }
        commands.extend(self.stages[idx].commands.clone());
        let outer = std::mem::replace(&mut self.current, idx);
        let mut step_label = String::new();
        if self.opts.multi_platform {
            step_label.push_str(&platform.format());
            step_label.push(' ');
        }
        if self.stages.len() > 1 {
            let name = self.stages[idx]
                .name
                .clone()
                .unwrap_or_else(|| format!("stage-{idx}"));
            step_label.push_str(&name);
            step_label.push(' ');
        }
        let step_total = usize::from(from_image.is_some())
            + commands
                .iter()
                .filter(|n| matches!(n.keyword.as_str(), "add" | "copy" | "run" | "workdir"))
                .count();
        let mut st = StageState {
            result,
            args: Vec::new(),
            cmd_set: false,
            platform,
            step_label,
            step_index: 0,
            step_total,
        };
        if let Some((op, pinned)) = from_image {
            let name = st.step_name(&format!("FROM {pinned}"));
            self.builder.set_description(&op.digest, &name);
        }
        for node in &commands {
            self.dispatch(&mut st, node)?;
            // Every RUN carries its stage's environment: the graph, not
            // only each variable, needs a bound.
            if self.builder.encoded_len() > MAX_GRAPH_BYTES {
                return Err(self.err(
                    node.start_line,
                    format!("the build graph grew past {} MiB", MAX_GRAPH_BYTES >> 20),
                ));
            }
        }
        self.current = outer;
        self.in_progress.remove(&idx);
        // The SBOM switches: the global value, then the stage's own ARG.
        let stage_name = self.stages[idx].name.clone().unwrap_or_default();
        let meta = self.meta_env();
        let mut scans = (false, false);
        for (name, flag) in [
            (SBOM_SCAN_STAGE, &mut scans.0),
            (SBOM_SCAN_CONTEXT, &mut scans.1),
        ] {
            if let Some((_, v)) = meta.iter().rev().find(|(k, _)| k == name) {
                *flag = sbom_enabled_for(&stage_name, v);
            }
            for (k, v) in &st.args {
                if k == name
                    && let Some(v) = v
                {
                    *flag = sbom_enabled_for(&stage_name, v);
                }
            }
        }
        scans.0 |= self.opts.sbom_scan_stages;
        scans.1 |= self.opts.sbom_scan_context;
        self.sbom_scans.insert(idx, scans);
        self.done.insert(idx, st.result.clone());
        Ok(st.result)
    }
}

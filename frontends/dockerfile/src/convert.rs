//! Dockerfile → build graph and image config, with Docker's semantics for
//! stages, ARG scoping, expansion and config-changing instructions.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_definition::image::{HealthConfig, History, Image};
use kiln_definition::text::{MAX_MESSAGE, bounded};
use kiln_definition::{GraphBuilder, OutputRef, pb};

use crate::parser::{self, Node};
use crate::shell::Lex;

pub const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// The identifier of the build context source.
pub const CONTEXT_SOURCE: &str = "local://context";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {}{}", bounded(message, MAX_MESSAGE), snippet(*line, source_line, token.as_deref()))]
pub struct FrontendError {
    pub file: String,
    /// 1-based; 0 when the error is about the whole file.
    pub line: usize,
    pub source_line: String,
    pub message: String,
    /// The word on the line the error is about; shown with a caret under it.
    pub token: Option<String>,
}

/// The offending line, and a caret under `token` when it appears there:
///
/// ```text
///     2 | COPY --chmoud=755 a /b
///       |      ^^^^^^^^
/// ```
fn snippet(line: usize, text: &str, token: Option<&str>) -> String {
    if text.is_empty() {
        return String::new();
    }
    // A window of a long line, around the token when there is one.
    let token = token.filter(|t| !t.is_empty() && t.len() <= SNIPPET_WIDTH);
    let at = token.and_then(|t| text.find(t)).unwrap_or(0);
    let mut start = at.saturating_sub(SNIPPET_WIDTH / 4);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + SNIPPET_WIDTH).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let (pre, post) = (
        if start > 0 { "…" } else { "" },
        if end < text.len() { "…" } else { "" },
    );
    let shown = format!("{pre}{}{post}", &text[start..end]);
    let mut out = format!("\n {line:>4} | {shown}");
    if let Some(col) = token.and_then(|t| {
        shown
            .find(t)
            .map(|at| (shown[..at].chars().count(), t.chars().count()))
    }) {
        let (start, len) = col;
        out.push_str(&format!(
            "\n {:>4} | {}{}",
            "",
            " ".repeat(start),
            "^".repeat(len)
        ));
    }
    out
}

/// Characters of the offending line shown in an error.
const SNIPPET_WIDTH: usize = 200;

/// ` (did you mean X?)` when one of `known` is within two edits of `word`.
fn did_you_mean<'a>(word: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let word = word.to_lowercase();
    known
        .into_iter()
        .map(|k| (levenshtein(&word, &k.to_lowercase()), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean {k}?)"))
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: String,
}

impl Platform {
    /// The platform of the machine running this code.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: String::new(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] => Some(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: String::new(),
            }),
            [os, arch, variant] => Some(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: variant.to_string(),
            }),
            _ => None,
        }
    }

    pub fn format(&self) -> String {
        if self.variant.is_empty() {
            format!("{}/{}", self.os, self.architecture)
        } else {
            format!("{}/{}/{}", self.os, self.architecture, self.variant)
        }
    }

    fn to_pb(&self) -> pb::Platform {
        pb::Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// Resolves an image reference to its config (FROM an image).
pub trait ImageResolver {
    /// Returns the canonical reference (pinned by digest where possible) and config.
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<(String, Image), String>;
}

/// A resolver for builds that use no registry images.
pub struct NoImages;
impl ImageResolver for NoImages {
    fn resolve(&self, reference: &str, _: &Platform) -> Result<(String, Image), String> {
        Err(format!(
            "cannot use image {reference:?}: this daemon has no registry access configured"
        ))
    }
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub filename: String,
    pub target: Option<String>,
    pub build_args: BTreeMap<String, String>,
    pub target_platform: Platform,
    pub build_platform: Platform,
    pub no_cache: bool,
    /// Named build contexts: name -> `local:NAME` (a directory the client
    /// serves as context NAME) or `docker-image://REF`.
    pub named_contexts: BTreeMap<String, String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            filename: "Dockerfile".into(),
            target: None,
            build_args: BTreeMap::new(),
            target_platform: Platform::host(),
            build_platform: Platform::host(),
            no_cache: false,
            named_contexts: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildWarning {
    pub rule: String,
    pub message: String,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Converted {
    pub definition: pb::Definition,
    pub image: Image,
    pub warnings: Vec<BuildWarning>,
    /// The main-context paths the build reads, when not all of it (the
    /// client then sends only these; `.dockerignore` still applies).
    pub context_paths: Option<Vec<String>>,
    /// Whether the result is an empty filesystem (no ops at all).
    pub scratch: bool,
}

const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// Args Docker passes through without declaration and keeps out of history.
const PROXY_ARGS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
];

struct StageDef {
    name: Option<String>,
    base: String,
    platform: Option<String>,
    from_node: Node,
    commands: Vec<Node>,
}

#[derive(Clone)]
struct StageResult {
    state: Option<OutputRef>,
    image: Image,
}

struct Ctx<'a> {
    opts: &'a ConvertOptions,
    images: &'a dyn ImageResolver,
    builder: GraphBuilder,
    lex: Lex,
    stages: Vec<StageDef>,
    meta_args: Vec<(String, Option<String>)>,
    done: HashMap<usize, StageResult>,
    in_progress: HashSet<usize>,
    warnings: Vec<BuildWarning>,
    lines: Vec<String>,
    context: Option<OutputRef>,
    /// Paths of the main context the build reads (None: all of it).
    context_paths: Option<std::collections::BTreeSet<String>>,
    /// The stage being converted.
    current: usize,
}

impl Ctx<'_> {
    fn err(&self, line: usize, message: impl Into<String>) -> FrontendError {
        FrontendError {
            file: self.opts.filename.clone(),
            line,
            source_line: line
                .checked_sub(1)
                .and_then(|i| self.lines.get(i))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_default(),
            message: message.into(),
            token: None,
        }
    }

    /// An error about one word of the line: the rendering puts a caret under it.
    fn err_at(&self, line: usize, token: &str, message: impl Into<String>) -> FrontendError {
        FrontendError {
            token: Some(token.to_string()),
            ..self.err(line, message)
        }
    }

    fn loc(&self, node: &Node) -> String {
        format!("{}:{}", self.opts.filename, node.start_line)
    }

    fn builtin_args(&self) -> Vec<(String, String)> {
        let t = &self.opts.target_platform;
        let b = &self.opts.build_platform;
        vec![
            ("TARGETPLATFORM".into(), t.format()),
            ("TARGETOS".into(), t.os.clone()),
            ("TARGETARCH".into(), t.architecture.clone()),
            ("TARGETVARIANT".into(), t.variant.clone()),
            ("BUILDPLATFORM".into(), b.format()),
            ("BUILDOS".into(), b.os.clone()),
            ("BUILDARCH".into(), b.architecture.clone()),
            ("BUILDVARIANT".into(), b.variant.clone()),
        ]
    }

    /// Values of the global ARGs (for FROM and for stage re-declaration).
    fn meta_env(&self) -> Vec<(String, String)> {
        let mut env = self.builtin_args();
        for (k, v) in &self.meta_args {
            if let Some(v) = self.opts.build_args.get(k) {
                env.push((k.clone(), v.clone()));
            } else if let Some(v) = v {
                env.push((k.clone(), v.clone()));
            }
        }
        env
    }

    /// A local source served by the client under `name`.
    fn local_source(&mut self, name: &str) -> OutputRef {
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("local://{name}"),
                attrs: vec![],
            })),
            ..Default::default()
        };
        self.builder
            .add(&op, &format!("[internal] load build context {name}"), "")
    }

    /// A named context's replacement for `name`, if one was given:
    /// Ok(Some(Left(local name))) or Ok(Some(Right(image ref))).
    fn named_context(&self, name: &str) -> Option<Result<String, String>> {
        let v = self
            .opts
            .named_contexts
            .get(name)
            .or_else(|| self.opts.named_contexts.get(&name.to_lowercase()))?;
        if let Some(local) = v.strip_prefix("local:") {
            return Some(Ok(local.to_string()));
        }
        if v.starts_with("oci-layout://") {
            // Resolved like an image; the resolver reads the client's layout.
            return Some(Err(v.clone()));
        }
        v.strip_prefix("docker-image://")
            .map(|r| Err(r.to_string()))
    }

    /// Records that the build reads `path` (a COPY/ADD source or a bind
    /// mount source) from the main context, so only what is read needs to
    /// be transferred, as BuildKit does. A pattern keeps its literal
    /// leading directories; the context root means everything.
    fn note_context_path(&mut self, path: &str) {
        let Some(paths) = self.context_paths.as_mut() else {
            return;
        };
        let mut kept = Vec::new();
        for comp in path.split('/') {
            if comp.contains(['*', '?', '[', '\\']) {
                break;
            }
            match comp {
                "" | "." => {}
                ".." => {
                    kept.pop();
                }
                c => kept.push(c),
            }
        }
        if kept.is_empty() {
            self.context_paths = None;
        } else {
            paths.insert(kept.join("/"));
        }
    }

    fn context(&mut self) -> OutputRef {
        if let Some(c) = &self.context {
            return c.clone();
        }
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: CONTEXT_SOURCE.into(),
                attrs: vec![],
            })),
            ..Default::default()
        };
        let r = self.builder.add(&op, "[internal] load build context", "");
        self.context = Some(r.clone());
        r
    }

    /// A stage by name among the first `before` stages. `FROM` only sees the
    /// stages above it (BuildKit registers stages in order); `--from=`,
    /// `RUN --mount from=` and `--target` see them all. Names only: a bare
    /// number is an image name here, as in BuildKit's `findStateByName`.
    fn stage_named(&self, name: &str, before: usize) -> Option<usize> {
        let lower = name.to_lowercase();
        let limit = before.min(self.stages.len());
        self.stages[..limit]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
    }

    /// The stage `COPY --from=` names: a stage name (any stage, before or
    /// after; a reference back to itself is a cycle) or a stage index.
    fn copy_from_stage(&self, name: &str, line: usize) -> Result<Option<usize>, FrontendError> {
        if let Ok(i) = name.parse::<i64>() {
            if i < 0 || i as usize >= self.stages.len() {
                return Err(self.err_at(line, name, format!("invalid stage index {i}")));
            }
            return Ok(Some(i as usize));
        }
        Ok(self.stage_named(name, usize::MAX))
    }

    fn convert_stage(&mut self, idx: usize) -> Result<StageResult, FrontendError> {
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
            }
        } else if base == "scratch" {
            StageResult {
                state: None,
                image: Image::empty(&platform.os, &platform.architecture, &platform.variant),
            }
        } else if let Some(dep) = self.stage_named(&base, idx).filter(|_| named.is_none()) {
            self.convert_stage(dep)?
        } else {
            let (pinned, image) = self
                .images
                .resolve(&base, &platform)
                .map_err(|e| self.err(from_line, e))?;
            let op = pb::Op {
                op: Some(pb::op::Op::Source(pb::SourceOp {
                    identifier: image_source(&pinned),
                    attrs: vec![],
                })),
                platform: Some(platform.to_pb()),
                ..Default::default()
            };
            let r = self.builder.add(
                &op,
                &format!("[internal] load {pinned}"),
                &self.loc(&self.stages[idx].from_node),
            );
            StageResult {
                state: Some(r),
                image,
            }
        };
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
        let mut st = StageState {
            result,
            args: Vec::new(),
            cmd_set: false,
            platform,
        };
        for node in &commands {
            self.dispatch(&mut st, node)?;
        }
        self.current = outer;
        self.in_progress.remove(&idx);
        self.done.insert(idx, st.result.clone());
        Ok(st.result)
    }

    /// Lint rules that look at one instruction without running anything.
    fn check_instruction(&mut self, st: &StageState, node: &Node) {
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

    fn dispatch(&mut self, st: &mut StageState, node: &Node) -> Result<(), FrontendError> {
        self.check_instruction(st, node);
        let line = node.start_line;
        let env = st.expansion_env();
        let expand = |ctx: &Ctx, s: &str| -> Result<String, FrontendError> {
            ctx.lex
                .process_word(s, &env)
                .map_err(|e| ctx.err(line, e.to_string()))
        };
        let allowed_flags: &[&str] = match node.keyword.as_str() {
            "copy" => &["from", "chown", "chmod", "link", "parents", "exclude"],
            "add" => &[
                "chown",
                "chmod",
                "link",
                "checksum",
                "keep-git-dir",
                "exclude",
                "unpack",
            ],
            "run" => &["mount", "network", "security"],
            "healthcheck" => &[
                "interval",
                "timeout",
                "start-period",
                "start-interval",
                "retries",
            ],
            "from" => &["platform"],
            _ => &[],
        };
        let flags = parse_flags(&node.flags, allowed_flags).map_err(|(flag, e)| {
            self.err_at(line, &flag, format!("{}: {e}", node.keyword.to_uppercase()))
        })?;
        let img = &mut st.result.image;
        match node.keyword.as_str() {
            "env" => {
                let mut parts = Vec::new();
                let mut updates = Vec::new();
                for kv in node.args.chunks(3) {
                    let key = expand(self, &kv[0])?;
                    let value = expand(self, &kv[1])?;
                    parts.push(format!("{key}={value}"));
                    updates.push((key, value));
                }
                for (k, v) in updates {
                    set_env(&mut img.config.env, &k, &v);
                }
                commit(img, format!("ENV {}", parts.join(" ")), false);
            }
            "label" => {
                let mut parts = Vec::new();
                for kv in node.args.chunks(3) {
                    let key = expand(self, &kv[0])?;
                    let value = expand(self, &kv[1])?;
                    parts.push(format!("{key}={value}"));
                    img.config.labels.insert(key, value);
                }
                commit(img, format!("LABEL {}", parts.join(" ")), false);
            }
            "maintainer" => {
                let m = node.args.first().cloned().unwrap_or_default();
                self.warn(
                    "MaintainerDeprecated",
                    "Maintainer instruction is deprecated in favor of using label",
                    line,
                );
                img.config.labels.insert("maintainer".into(), m.clone());
                commit(img, format!("MAINTAINER {m}"), false);
            }
            "workdir" => {
                let arg = node
                    .args
                    .first()
                    .ok_or_else(|| self.err(line, "WORKDIR requires exactly one argument"))?;
                let wd = expand(self, arg)?;
                let wd = if wd.starts_with('/') {
                    clean_path(&wd)
                } else {
                    self.warn("WorkdirRelativePath", &format!("Relative workdir {wd:?} can have unexpected results if the base image changes"), line);
                    clean_path(&format!("{}/{}", img.config.working_dir, wd))
                };
                img.config.working_dir = wd.clone();
                let mut with_layer = false;
                if wd != "/" {
                    let chown = user_chown(&img.config.user);
                    let action = pb::FileAction {
                        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                            path: wd.clone(),
                            mode: 0o755,
                            make_parents: true,
                            chown,
                        })),
                    };
                    st.result.state = Some(self.file_op(
                        st.result.state.clone(),
                        vec![],
                        vec![action],
                        &format!("WORKDIR {wd}"),
                        node,
                        &st.platform,
                    ));
                    with_layer = true;
                }
                commit(&mut st.result.image, format!("WORKDIR {wd}"), with_layer);
            }
            "user" => {
                let arg = node
                    .args
                    .first()
                    .ok_or_else(|| self.err(line, "USER requires exactly one argument"))?;
                let u = expand(self, arg)?;
                img.config.user = u.clone();
                commit(img, format!("USER {u}"), false);
            }
            "cmd" | "entrypoint" => {
                let args = if node.json {
                    node.args.clone()
                } else {
                    if !node.args.is_empty() {
                        self.warn("JSONArgsRecommended", &format!("JSON arguments recommended for {} to prevent unintended behavior related to OS signals", node.keyword.to_uppercase()), line);
                    }
                    let mut v = shell_of(img);
                    v.extend(node.args.iter().cloned());
                    v
                };
                let text = json_list(&args);
                if node.keyword == "cmd" {
                    img.config.cmd = Some(args);
                    st.cmd_set = true;
                    commit(img, format!("CMD {text}"), false);
                } else {
                    img.config.entrypoint = Some(args);
                    if !st.cmd_set {
                        img.config.cmd = None;
                    }
                    commit(img, format!("ENTRYPOINT {text}"), false);
                }
            }
            "expose" => {
                let mut ports = Vec::new();
                for a in &node.args {
                    let p = expand(self, a)?;
                    for port in expose_ports(&p).map_err(|e| self.err(line, e))? {
                        ports.push(port);
                    }
                }
                for p in &ports {
                    img.config
                        .exposed_ports
                        .insert(p.clone(), Default::default());
                }
                let desc: Vec<String> = ports.iter().map(|p| format!("{p}:{{}}")).collect();
                commit(img, format!("EXPOSE map[{}]", desc.join(" ")), false);
            }
            "volume" => {
                let mut vols = Vec::new();
                for a in &node.args {
                    let v = expand(self, a)?;
                    if v.trim().is_empty() {
                        return Err(self.err(line, "VOLUME specified can not be an empty string"));
                    }
                    img.config.volumes.insert(v.clone(), Default::default());
                    vols.push(v);
                }
                commit(img, format!("VOLUME [{}]", vols.join(" ")), false);
            }
            "stopsignal" => {
                let arg = node
                    .args
                    .first()
                    .ok_or_else(|| self.err(line, "STOPSIGNAL requires exactly one argument"))?;
                let s = expand(self, arg)?;
                img.config.stop_signal = s.clone();
                commit(img, format!("STOPSIGNAL {s}"), false);
            }
            "shell" => {
                if !node.json {
                    return Err(self.err(line, "SHELL requires the arguments to be in JSON form"));
                }
                if node.args.is_empty() {
                    return Err(self.err(line, "SHELL requires at least one argument"));
                }
                img.config.shell = node.args.clone();
                commit(img, format!("SHELL [{}]", node.args.join(" ")), false);
            }
            "healthcheck" => {
                let hc = self.healthcheck(node, &flags)?;
                let desc = format!(
                    "HEALTHCHECK &{{{} }}",
                    hc.test
                        .iter()
                        .map(|t| format!("{t:?}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                img.config.healthcheck = Some(hc);
                commit(img, desc, false);
            }
            "onbuild" => {
                let sub = node
                    .sub
                    .as_ref()
                    .ok_or_else(|| self.err(line, "ONBUILD requires at least one argument"))?;
                if matches!(sub.keyword.as_str(), "onbuild" | "from" | "maintainer") {
                    return Err(self.err(
                        line,
                        format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            sub.keyword.to_uppercase()
                        ),
                    ));
                }
                let text = node.original.trim();
                let trigger = text[text.find(char::is_whitespace).unwrap_or(text.len())..]
                    .trim()
                    .to_string();
                img.config.on_build.push(trigger.clone());
                commit(img, format!("ONBUILD {trigger}"), false);
            }
            "arg" => {
                for word in &node.args {
                    let (name, default) = match word.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(expand(self, v)?)),
                        None => (word.clone(), None),
                    };
                    let value = self
                        .opts
                        .build_args
                        .get(&name)
                        .cloned()
                        .or(default)
                        .or_else(|| {
                            self.meta_env()
                                .into_iter()
                                .rev()
                                .find(|(k, _)| *k == name)
                                .map(|(_, v)| v)
                        });
                    if is_secret_name(&name) {
                        self.warn("SecretsUsedInArgOrEnv", &format!("Do not use ARG or ENV instructions for sensitive data (ARG {name:?})"), line);
                    }
                    st.args.push((name.clone(), value.clone()));
                    let img = &mut st.result.image;
                    match value {
                        Some(v) => commit(img, format!("ARG {name}={v}"), false),
                        None => commit(img, format!("ARG {name}"), false),
                    }
                }
            }
            "copy" | "add" => self.copy(st, node, &flags)?,
            "run" => self.run(st, node, &flags)?,
            "from" => return Err(self.err(line, "FROM inside a stage")),
            other => {
                let written = self
                    .lines
                    .get(line.saturating_sub(1))
                    .and_then(|l| l.split_whitespace().next())
                    .unwrap_or(other)
                    .to_string();
                return Err(self.err_at(
                    line,
                    &written,
                    format!(
                        "unknown instruction: {}{}",
                        other.to_uppercase(),
                        suggest(other)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn warn(&mut self, rule: &str, message: &str, line: usize) {
        self.warnings.push(BuildWarning {
            rule: rule.into(),
            message: message.into(),
            line,
        });
    }

    fn healthcheck(&self, node: &Node, flags: &Flags) -> Result<HealthConfig, FrontendError> {
        let line = node.start_line;
        let typ = node
            .args
            .first()
            .map(|s| s.to_uppercase())
            .unwrap_or_default();
        let mut hc = HealthConfig::default();
        match typ.as_str() {
            "NONE" => {
                if node.args.len() > 1 || !flags.is_empty() {
                    return Err(self.err(line, "HEALTHCHECK NONE takes no arguments"));
                }
                hc.test = vec!["NONE".into()];
                return Ok(hc);
            }
            "CMD" => {
                let rest = &node.args[1..];
                if rest.is_empty() {
                    return Err(self.err(line, "Missing command after HEALTHCHECK CMD"));
                }
                if node.json {
                    hc.test = std::iter::once("CMD".to_string())
                        .chain(rest.iter().cloned())
                        .collect();
                } else {
                    hc.test = vec!["CMD-SHELL".into(), rest.join(" ")];
                }
            }
            other => {
                let written = self
                    .lines
                    .get(line.saturating_sub(1))
                    .and_then(|l| l.split_whitespace().next())
                    .unwrap_or(other)
                    .to_string();
                return Err(self.err_at(
                    line,
                    &written,
                    format!("Unknown type {other:?} in HEALTHCHECK (try CMD)"),
                ));
            }
        }
        let dur = |name: &str| -> Result<i64, FrontendError> {
            match flags.get(name) {
                None => Ok(0),
                Some(v) => {
                    let d = parse_duration(v).ok_or_else(|| {
                        self.err(line, format!("invalid duration {v:?} for --{name}"))
                    })?;
                    if d != 0 && d < 1_000_000 {
                        return Err(
                            self.err(line, format!("Interval {name:?} cannot be less than 1ms"))
                        );
                    }
                    Ok(d)
                }
            }
        };
        hc.interval = dur("interval")?;
        hc.timeout = dur("timeout")?;
        hc.start_period = dur("start-period")?;
        hc.start_interval = dur("start-interval")?;
        if let Some(r) = flags.get("retries") {
            hc.retries = r
                .parse()
                .map_err(|_| self.err(line, format!("invalid --retries {r:?}")))?;
            if hc.retries < 0 {
                return Err(self.err(line, "--retries cannot be negative"));
            }
        }
        Ok(hc)
    }

    fn file_op(
        &mut self,
        base: Option<OutputRef>,
        extra_inputs: Vec<OutputRef>,
        actions: Vec<pb::FileAction>,
        description: &str,
        node: &Node,
        platform: &Platform,
    ) -> OutputRef {
        let mut inputs = Vec::new();
        let base_idx = match &base {
            Some(b) => {
                inputs.push(pb::Input {
                    digest: b.digest.to_string(),
                    index: b.index,
                });
                0
            }
            None => -1,
        };
        for e in extra_inputs {
            inputs.push(pb::Input {
                digest: e.digest.to_string(),
                index: e.index,
            });
        }
        let op = pb::Op {
            inputs,
            op: Some(pb::op::Op::File(pb::FileOp {
                base: base_idx,
                actions,
            })),
            platform: Some(platform.to_pb()),
        };
        let r = self.builder.add(&op, description, &self.loc(node));
        if self.opts.no_cache {
            self.builder.set_ignore_cache(&r.digest);
        }
        r
    }

    fn copy(
        &mut self,
        st: &mut StageState,
        node: &Node,
        flags: &Flags,
    ) -> Result<(), FrontendError> {
        let line = node.start_line;
        let is_add = node.keyword == "add";
        let name = if is_add { "ADD" } else { "COPY" };
        let env = st.expansion_env();
        let ex = |ctx: &Ctx, s: &str| {
            ctx.lex
                .process_word(s, &env)
                .map_err(|e| ctx.err(line, e.to_string()))
        };
        if node.args.len() < 2 && node.heredocs.is_empty() {
            return Err(self.err(line, format!("{name} requires at least two arguments, but only one was provided. Destination could not be determined")));
        }
        let mut args: Vec<String> = Vec::new();
        for a in &node.args {
            args.push(ex(self, a)?);
        }
        let dest_raw = args.pop().unwrap_or_default();
        let srcs = args;
        // Relative destinations are relative to the workdir; a trailing slash means "into".
        let wd = &st.result.image.config.working_dir;
        let mut dest = if dest_raw.starts_with('/') {
            dest_raw.clone()
        } else {
            format!(
                "{}/{}",
                if wd.is_empty() {
                    ""
                } else {
                    wd.trim_end_matches('/')
                },
                dest_raw
            )
        };
        let dest_is_dir = dest_raw.ends_with('/')
            || dest_raw == "."
            || dest_raw.ends_with("/.")
            || dest_raw.is_empty();
        dest = clean_path(&dest);
        if dest_is_dir && dest != "/" {
            dest.push('/');
        }
        let heredoc_names: HashSet<&str> = node.heredocs.iter().map(|h| h.name.as_str()).collect();
        let non_heredoc: Vec<&String> = srcs
            .iter()
            .filter(|s| !heredoc_names.contains(parse_heredoc_src(s).as_str()))
            .collect();
        if srcs.len() > 1 && !dest_is_dir {
            return Err(self.err(line, format!("When using {name} with more than one source file, the destination must be a directory and end with a /")));
        }
        let chown = match flags.get("chown") {
            Some(c) => {
                let c = ex(self, c)?;
                let (u, g) = match c.split_once(':') {
                    Some((u, g)) => (u.to_string(), g.to_string()),
                    None => (c.clone(), String::new()),
                };
                Some(pb::ChownOpt { user: u, group: g })
            }
            None => None,
        };
        let (mode, chmod_symbolic) = match flags.get("chmod") {
            Some(m) => {
                let m = ex(self, m)?;
                match u32::from_str_radix(&m, 8) {
                    Ok(v) if v <= 0o7777 => (v, String::new()),
                    Ok(_) => {
                        return Err(
                            self.err(line, format!("invalid chmod {m:?}: mode out of range"))
                        );
                    }
                    Err(_) => {
                        validate_symbolic_mode(&m)
                            .map_err(|e| self.err(line, format!("invalid chmod {m:?}: {e}")))?;
                        (0, m)
                    }
                }
            }
            None => (0, String::new()),
        };
        let mut excludes = Vec::new();
        for e in flags.all("exclude") {
            excludes.push(ex(self, e)?);
        }
        let parents = flags.get("parents").is_some_and(|v| v != "false");
        let from = flags.get("from").map(|f| ex(self, f)).transpose()?;
        let mut actions = Vec::new();
        let mut extra = Vec::new();
        // Heredoc sources become files made in place.
        for h in &node.heredocs {
            let data = if h.expand {
                self.lex
                    .process_word(&h.content, &env)
                    .map_err(|e| self.err(line, e.to_string()))?
            } else {
                h.content.clone()
            };
            let path = if dest_is_dir || srcs.len() > 1 {
                format!("{}{}", dest, h.name)
            } else {
                dest.clone()
            };
            actions.push(pb::FileAction {
                action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                    path,
                    mode: if mode != 0 { mode } else { 0o644 },
                    data: data.into_bytes(),
                    chown: chown.clone(),
                })),
            });
        }
        if !non_heredoc.is_empty() {
            let named_local = from.as_ref().and_then(|f| match self.named_context(f) {
                Some(Ok(l)) => Some(l),
                _ => None,
            });
            let (source, source_desc) = match &from {
                Some(f) if named_local.is_some() => (
                    self.local_source(named_local.as_deref().unwrap_or_default()),
                    format!("--from={f} "),
                ),
                Some(f) => {
                    if is_add {
                        return Err(self.err(line, "ADD does not support --from; use COPY --from"));
                    }
                    let named = self.named_context(f);
                    let idx = match named {
                        Some(_) => None,
                        None => self.copy_from_stage(f, line)?,
                    };
                    let f = &match named {
                        Some(Err(image)) => image,
                        _ => f.clone(),
                    };
                    match idx {
                        Some(i) => {
                            let r = self.convert_stage(i)?;
                            let stage_state = match r.state {
                                Some(s) => s,
                                None => {
                                    // A scratch stage is empty: make an explicit empty state.
                                    self.file_op(
                                        None,
                                        vec![],
                                        vec![],
                                        "[internal] scratch",
                                        node,
                                        &st.platform,
                                    )
                                }
                            };
                            (stage_state, format!("--from={f} "))
                        }
                        None => {
                            let (pinned, _) = self
                                .images
                                .resolve(f, &st.platform)
                                .map_err(|e| self.err(line, e))?;
                            let op = pb::Op {
                                op: Some(pb::op::Op::Source(pb::SourceOp {
                                    identifier: image_source(&pinned),
                                    attrs: vec![],
                                })),
                                platform: Some(st.platform.to_pb()),
                                ..Default::default()
                            };
                            (
                                self.builder.add(
                                    &op,
                                    &format!("[internal] load {pinned}"),
                                    &self.loc(node),
                                ),
                                format!("--from={f} "),
                            )
                        }
                    }
                }
                None if is_add && non_heredoc.len() == 1 && is_remote(non_heredoc[0]) => {
                    // Remote ADD sources are their own source op; the copy takes its root.
                    let url = non_heredoc[0].clone();
                    let mut attrs = Vec::new();
                    let git = parse_git_ref(&url);
                    let identifier = match &git {
                        Some(g) => {
                            for (k, v) in [("ref", &g.reference), ("subdir", &g.subdir)] {
                                if !v.is_empty() {
                                    attrs.push(pb::KeyValue {
                                        key: k.into(),
                                        value: v.clone(),
                                    });
                                }
                            }
                            format!("git:{}", g.remote)
                        }
                        None => url.clone(),
                    };
                    // For a git source the checksum is the commit the ref must resolve to.
                    if let Some(c) = flags.get("checksum") {
                        if git.is_some() && !is_commit_id(c) {
                            return Err(self.err(
                                line,
                                format!(
                                    "ADD --checksum={c}: a git source's checksum is a commit id"
                                ),
                            ));
                        }
                        attrs.push(pb::KeyValue {
                            key: "checksum".into(),
                            value: c.clone(),
                        });
                    }
                    if flags.get("keep-git-dir").is_some_and(|v| v != "false") {
                        attrs.push(pb::KeyValue {
                            key: "keep-git-dir".into(),
                            value: "true".into(),
                        });
                    }
                    let op = pb::Op {
                        op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
                        ..Default::default()
                    };
                    (
                        self.builder.add(
                            &op,
                            &format!("[internal] load remote source {url}"),
                            &self.loc(node),
                        ),
                        String::new(),
                    )
                }
                None => {
                    for src in &non_heredoc {
                        self.note_context_path(src);
                    }
                    (self.context(), String::new())
                }
            };
            let base_present = st.result.state.is_some();
            let src_idx = if base_present { 1 } else { 0 };
            extra.push(source);
            for s in &non_heredoc {
                if is_remote(s) && !is_add {
                    return Err(self.err(line, format!("COPY {s}: source can't be a URL for COPY")));
                }
                if from.is_none() && escapes_root(s) {
                    return Err(self.err(
                        line,
                        format!("{name} {s}: forbidden path outside the build context"),
                    ));
                }
            }
            actions.push(pb::FileAction {
                action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                    source_input: src_idx,
                    // A remote source's snapshot holds one file named after the URL.
                    src: non_heredoc
                        .iter()
                        .map(|s| {
                            if parse_git_ref(s).is_some() {
                                // A checkout: its whole tree is copied.
                                "/".to_string()
                            } else if is_remote(s) {
                                format!("/{}", kiln_definition::url_filename(s))
                            } else {
                                s.to_string()
                            }
                        })
                        .collect(),
                    dest: dest.clone(),
                    chown: chown.clone(),
                    mode,
                    chmod_symbolic,
                    follow_symlinks: true,
                    dir_copy_contents: true,
                    allow_wildcard: true,
                    allow_empty_wildcard: false,
                    create_dest_path: true,
                    exclude_patterns: excludes,
                    // Downloads are not unpacked unless asked (ADD --unpack=true), as in BuildKit.
                    attempt_unpack: is_add
                        && if non_heredoc.iter().any(|s| is_remote(s)) {
                            flags.get("unpack").is_some_and(|v| v == "true")
                        } else {
                            flags.get("unpack").is_none_or(|v| v != "false")
                        },
                    parents,
                    timestamp: -1,
                })),
            });
            let desc = format!(
                "{name} {}{}{}",
                source_desc,
                non_heredoc
                    .iter()
                    .map(|s| format!("{s} "))
                    .collect::<String>(),
                dest_raw
            );
            let state = self.file_op(
                st.result.state.clone(),
                extra,
                actions,
                &desc,
                node,
                &st.platform,
            );
            st.result.state = Some(state);
            commit(
                &mut st.result.image,
                format!(
                    "{name} {}{} {} # buildkit",
                    source_desc,
                    srcs.join(" "),
                    dest_raw
                )
                .replace("  ", " "),
                true,
            );
            return Ok(());
        }
        let desc = format!("{name} {} {}", srcs.join(" "), dest_raw);
        let state = self.file_op(
            st.result.state.clone(),
            extra,
            actions,
            &desc,
            node,
            &st.platform,
        );
        st.result.state = Some(state);
        commit(&mut st.result.image, format!("{desc} # buildkit"), true);
        Ok(())
    }

    fn run(
        &mut self,
        st: &mut StageState,
        node: &Node,
        flags: &Flags,
    ) -> Result<(), FrontendError> {
        let line = node.start_line;
        let img = &st.result.image;
        let env_for_expand = st.expansion_env();
        let mut args: Vec<String> = if node.json {
            node.args.clone()
        } else if let Some(h) = node.heredocs.first().filter(|h| {
            node.args.first().map(|a| a.trim()) == Some(&format!("<<{}", h.name))
                || node
                    .args
                    .first()
                    .is_some_and(|a| a.trim_start().starts_with("<<"))
        }) {
            // A heredoc as the whole command: its body is the script.
            // The shell expands (or not) the script at run time, as in BuildKit.
            let body = h.content.clone();
            if body.starts_with("#!") {
                // A shebang script runs as its own file through the interpreter.
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!(
                        "cat > /dev/shm/.kiln-heredoc <<'KILN_EOF'\n{body}KILN_EOF\nchmod +x /dev/shm/.kiln-heredoc && exec /dev/shm/.kiln-heredoc"
                    ),
                ]
            } else {
                let mut v = shell_of(img);
                v.push(body);
                v
            }
        } else {
            let mut v = shell_of(img);
            let mut cmd = node.args.join(" ");
            for h in &node.heredocs {
                // Other heredocs feed the command's stdin/fds: pass them to the shell as-is.
                cmd.push('\n');
                cmd.push_str(&h.content);
                cmd.push_str(&h.name);
            }
            v.push(cmd);
            v
        };
        if args.is_empty() {
            return Err(self.err(line, "RUN requires at least one argument"));
        }
        let _ = &env_for_expand;
        // Env: image env plus args in scope (as BuildKit passes them to RUN).
        let mut env: Vec<String> = Vec::new();
        let mut arg_env: Vec<String> = Vec::new();
        for (k, v) in &st.args {
            if let Some(v) = v
                && !img
                    .config
                    .env
                    .iter()
                    .any(|e| e.split_once('=').map(|x| x.0) == Some(k.as_str()))
            {
                arg_env.push(format!("{k}={v}"));
            }
        }
        for (k, v) in &self.opts.build_args {
            if PROXY_ARGS.contains(&k.as_str()) && !st.args.iter().any(|(n, _)| n == k) {
                env.push(format!("{k}={v}"));
            }
        }
        env.extend(img.config.env.iter().cloned());
        env.extend(arg_env.iter().cloned());
        let network = match flags.get("network").map(String::as_str) {
            None | Some("default") => pb::NetMode::NetUnset,
            Some("none") => pb::NetMode::NetNone,
            Some("host") => pb::NetMode::NetHost,
            Some(o) => {
                return Err(self.err(
                    line,
                    format!("unsupported network mode {o:?} (use default, none or host)"),
                ));
            }
        };
        let security = match flags.get("security").map(String::as_str) {
            None | Some("sandbox") => pb::SecurityMode::Sandbox,
            Some("insecure") => pb::SecurityMode::Insecure,
            Some(o) => return Err(self.err(line, format!("unsupported security mode {o:?}"))),
        };
        let mut inputs = Vec::new();
        let mut mounts = Vec::new();
        if let Some(s) = &st.result.state {
            inputs.push(pb::Input {
                digest: s.digest.to_string(),
                index: s.index,
            });
        }
        mounts.push(pb::Mount {
            input: if st.result.state.is_some() { 0 } else { -1 },
            dest: "/".into(),
            output: 0,
            ..Default::default()
        });
        for m in flags.all("mount") {
            let m = self
                .lex
                .process_word(m, &env_for_expand)
                .map_err(|e| self.err(line, e.to_string()))?;
            // Unnamed ssh sockets are numbered, as BuildKit does.
            let ssh_index = mounts
                .iter()
                .filter(|m| m.r#type == pb::MountType::Ssh as i32)
                .count();
            let mount = self.parse_mount(&m, line, &mut inputs, st, ssh_index)?;
            mounts.push(mount);
        }
        let wd = if img.config.working_dir.is_empty() {
            "/".to_string()
        } else {
            img.config.working_dir.clone()
        };
        let op = pb::Op {
            inputs,
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: std::mem::take(&mut args),
                    env,
                    cwd: wd,
                    user: img.config.user.clone(),
                    hostname: String::new(),
                }),
                mounts,
                network: network as i32,
                security: security as i32,
            })),
            platform: Some(st.platform.to_pb()),
        };
        let shown = node.original.trim();
        let r = self.builder.add(&op, shown, &self.loc(node));
        if self.opts.no_cache {
            self.builder.set_ignore_cache(&r.digest);
        }
        st.result.state = Some(r);
        let mut created_by = String::from("RUN ");
        if !arg_env.is_empty() {
            created_by.push_str(&format!("|{} {} ", arg_env.len(), arg_env.join(" ")));
        }
        let cmd = if node.json {
            json_list(&node.args)
        } else {
            format!(
                "{} {}",
                shell_of(&st.result.image).join(" "),
                node.args.join(" ")
            )
        };
        created_by.push_str(&cmd);
        commit(
            &mut st.result.image,
            format!("{created_by} # buildkit"),
            true,
        );
        Ok(())
    }

    fn parse_mount(
        &mut self,
        spec: &str,
        line: usize,
        inputs: &mut Vec<pb::Input>,
        st: &StageState,
        ssh_index: usize,
    ) -> Result<pb::Mount, FrontendError> {
        let mut m = pb::Mount {
            input: -1,
            output: -1,
            ..Default::default()
        };
        let mut typ = "bind".to_string();
        let mut from = None;
        let mut source = String::new();
        let mut readonly: Option<bool> = None;
        let mut id = String::new();
        let mut required = false;
        let mut target = String::new();
        let mut fields = Vec::new();
        for f in spec.split(',') {
            let (k, v) = match f.split_once('=') {
                Some((k, v)) => (k.trim().to_lowercase(), Some(v.trim().to_string())),
                None => (f.trim().to_lowercase(), None),
            };
            fields.push((k, v));
        }
        for (k, v) in &fields {
            if k == "type" {
                typ = v.clone().unwrap_or_default();
            }
        }
        let bool_of = |v: &Option<String>| v.as_deref().is_none_or(|s| s == "true" || s == "1");
        for (k, v) in fields {
            let val = v.clone().unwrap_or_default();
            match k.as_str() {
                "type" => {}
                "target" | "dst" | "destination" => target = val,
                "source" | "src" => source = val,
                "from" => from = Some(val),
                "ro" | "readonly" => readonly = Some(bool_of(&v)),
                "rw" | "readwrite" => readonly = Some(!bool_of(&v)),
                "id" => id = val,
                "sharing" => {
                    m.sharing = match val.as_str() {
                        "shared" => pb::CacheSharing::Shared,
                        "private" => pb::CacheSharing::Private,
                        "locked" => pb::CacheSharing::Locked,
                        o => return Err(self.err(line, format!("unsupported sharing value {o:?}"))),
                    } as i32
                }
                "mode" => {
                    m.mode = u32::from_str_radix(&val, 8)
                        .map_err(|_| self.err(line, format!("invalid mount mode {val:?}")))?
                }
                "uid" => {
                    m.uid = val
                        .parse()
                        .map_err(|_| self.err(line, format!("invalid uid {val:?}")))?
                }
                "gid" => {
                    m.gid = val
                        .parse()
                        .map_err(|_| self.err(line, format!("invalid gid {val:?}")))?
                }
                "size" => {
                    m.tmpfs_size = parse_size(&val)
                        .ok_or_else(|| self.err(line, format!("invalid size {val:?}")))?
                }
                "required" => required = bool_of(&v),
                "env" => {
                    m.secret_env = true;
                    target = val;
                }
                o => {
                    return Err(self.err_at(
                        line,
                        o,
                        format!(
                            "unexpected key '{o}' in '{spec}'{}",
                            did_you_mean(o, MOUNT_KEYS.iter().copied())
                        ),
                    ));
                }
            }
        }
        m.r#type = match typ.as_str() {
            "bind" => pb::MountType::Bind,
            "cache" => pb::MountType::Cache,
            "tmpfs" => pb::MountType::Tmpfs,
            "secret" => pb::MountType::Secret,
            "ssh" => pb::MountType::Ssh,
            o => return Err(self.err(line, format!("unsupported mount type {o:?}"))),
        } as i32;
        if target.is_empty() {
            match typ.as_str() {
                "secret" => {
                    target = format!(
                        "/run/secrets/{}",
                        if id.is_empty() {
                            source.rsplit('/').next().unwrap_or("")
                        } else {
                            &id
                        }
                    )
                }
                "ssh" => target = format!("/run/buildkit/ssh_agent.{ssh_index}"),
                // BuildKit accepts a bind without target; it lands in the working directory.
                "bind" => target = st.result.image.config.working_dir.clone(),
                _ => return Err(self.err(line, format!("mount type {typ} requires a target"))),
            }
        }
        m.dest = target;
        m.readonly = readonly.unwrap_or(typ == "bind");
        m.optional = !required;
        match typ.as_str() {
            "cache" => {
                m.cache_id = if id.is_empty() { m.dest.clone() } else { id };
                if m.mode == 0 {
                    m.mode = 0o755;
                }
            }
            "secret" | "ssh" => {
                m.secret_id = if id.is_empty() {
                    if typ == "ssh" {
                        "default".into()
                    } else {
                        source.rsplit('/').next().unwrap_or("").to_string()
                    }
                } else {
                    id
                };
                if m.mode == 0 {
                    m.mode = if typ == "ssh" { 0o600 } else { 0o400 };
                }
            }
            _ => {}
        }
        if typ == "bind" || (typ == "cache" && from.is_some()) {
            let named = from.as_deref().and_then(|f| self.named_context(f));
            let src_state = match (&from, named) {
                (Some(_), Some(Ok(local))) => Some(self.local_source(&local)),
                (Some(f), named) => {
                    match self.stage_named(f, usize::MAX).filter(|_| named.is_none()) {
                        Some(i) => self.convert_stage(i)?.state,
                        None => {
                            let f = match named {
                                Some(Err(image)) => image,
                                _ => f.clone(),
                            };
                            let (pinned, _) = self
                                .images
                                .resolve(&f, &st.platform)
                                .map_err(|e| self.err_at(line, &f, e))?;
                            let op = pb::Op {
                                op: Some(pb::op::Op::Source(pb::SourceOp {
                                    identifier: image_source(&pinned),
                                    attrs: vec![],
                                })),
                                platform: Some(st.platform.to_pb()),
                                ..Default::default()
                            };
                            Some(
                                self.builder
                                    .add(&op, &format!("[internal] load {pinned}"), ""),
                            )
                        }
                    }
                }
                (None, _) => {
                    self.note_context_path(&source);
                    Some(self.context())
                }
            };
            if let Some(s) = src_state {
                inputs.push(pb::Input {
                    digest: s.digest.to_string(),
                    index: s.index,
                });
                m.input = inputs.len() as i64 - 1;
            }
            m.selector = clean_path(&format!("/{source}"));
        }
        Ok(m)
    }
}

struct StageState {
    result: StageResult,
    args: Vec<(String, Option<String>)>,
    cmd_set: bool,
    platform: Platform,
}

impl StageState {
    /// Variables visible to expansion: declared args, then ENV (ENV wins).
    fn expansion_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .args
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())))
            .collect();
        for e in &self.result.image.config.env {
            if let Some((k, v)) = e.split_once('=') {
                env.push((k.into(), v.into()));
            }
        }
        env
    }
}

fn shell_of(img: &Image) -> Vec<String> {
    if img.config.shell.is_empty() {
        DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
    } else {
        img.config.shell.clone()
    }
}

fn user_chown(user: &str) -> Option<pb::ChownOpt> {
    if user.is_empty() {
        return None;
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    Some(pb::ChownOpt {
        user: u.into(),
        group: g.into(),
    })
}

fn commit(img: &mut Image, created_by: String, with_layer: bool) {
    img.history.push(History {
        created: None,
        created_by,
        comment: HISTORY_COMMENT.into(),
        empty_layer: !with_layer,
    });
}

fn set_env(env: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    for e in env.iter_mut() {
        if e.split_once('=').map(|x| x.0).unwrap_or(e) == key {
            *e = entry;
            return;
        }
    }
    env.push(entry);
}

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn is_secret_name(name: &str) -> bool {
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

fn parse_heredoc_src(s: &str) -> String {
    parser::parse_heredoc(s)
        .ok()
        .flatten()
        .map(|h| h.name)
        .unwrap_or_default()
}

/// Lexically cleans an absolute or relative path (like Go's path.Clean).
pub fn clean_path(p: &str) -> String {
    let abs = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !abs {
                    out.push("..");
                }
            }
            x => out.push(x),
        }
    }
    let joined = out.join("/");
    if abs {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

fn is_remote(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || parse_git_ref(s).is_some()
}

/// A git repository named in `ADD`: remote, ref and subdirectory.
#[derive(Debug, PartialEq, Eq)]
struct GitRef {
    remote: String,
    reference: String,
    subdir: String,
}

fn is_commit_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Recognises git sources the way BuildKit does: `git://`, `ssh://`,
/// scp-like `git@host:path`, `github.com/...`, and http(s) URLs whose path
/// ends in `.git`; the ref and subdirectory come from `#ref:subdir` or the
/// newer `?ref=..&subdir=..` query.
fn parse_git_ref(s: &str) -> Option<GitRef> {
    let (base, fragment) = match s.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (s, None),
    };
    let (base, query) = match base.split_once('?') {
        Some((b, q)) if !b.starts_with("git@") || b.contains('/') => (b, Some(q)),
        _ => (base, None),
    };
    let remote = if base.starts_with("git://") || base.starts_with("ssh://") {
        base.to_string()
    } else if let Some(rest) = base.strip_prefix("git@") {
        if !rest.contains(':') {
            return None;
        }
        base.to_string()
    } else if base.starts_with("github.com/") {
        format!("https://{base}")
    } else if (base.starts_with("http://") || base.starts_with("https://"))
        && base.trim_end_matches('/').ends_with(".git")
    {
        base.to_string()
    } else {
        return None;
    };
    let (mut reference, mut subdir) = match fragment {
        Some(f) => match f.split_once(':') {
            Some((r, d)) => (r.to_string(), d.to_string()),
            None => (f.to_string(), String::new()),
        },
        None => (String::new(), String::new()),
    };
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        match kv.split_once('=') {
            Some(("ref", v)) => reference = v.to_string(),
            Some(("subdir", v)) => subdir = v.to_string(),
            _ => {}
        }
    }
    Some(GitRef {
        remote,
        reference,
        subdir,
    })
}

fn escapes_root(src: &str) -> bool {
    clean_path(src.trim_start_matches('/')).starts_with("..") && !src.starts_with('/')
}

fn expose_ports(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    // "ip:host:container" forms keep the container port only.
    let ports = ports.rsplit(':').next().unwrap_or(ports);
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a, b),
        None => (ports, ports),
    };
    let lo: u32 = lo
        .parse()
        .map_err(|_| format!("invalid containerPort: {ports}"))?;
    let hi: u32 = hi
        .parse()
        .map_err(|_| format!("invalid containerPort: {ports}"))?;
    if hi < lo || hi > 65535 {
        return Err(format!("invalid port range: {ports}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// Go `time.ParseDuration` subset: sequences of number+unit.
fn parse_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += num * mult;
        rest = &rest[u..];
    }
    Some(total as i64)
}

fn parse_size(s: &str) -> Option<i64> {
    let l = s.to_lowercase();
    let (n, mult) = if let Some(x) = l.strip_suffix("gb").or(l.strip_suffix('g')) {
        (x, 1i64 << 30)
    } else if let Some(x) = l.strip_suffix("mb").or(l.strip_suffix('m')) {
        (x, 1 << 20)
    } else if let Some(x) = l.strip_suffix("kb").or(l.strip_suffix('k')) {
        (x, 1 << 10)
    } else {
        (l.strip_suffix('b').unwrap_or(&l), 1)
    };
    n.trim().parse::<i64>().ok().map(|v| v * mult)
}

/// Checks `u+x,g-w,o=r` style modes.
pub fn validate_symbolic_mode(m: &str) -> Result<(), String> {
    for clause in m.split(',') {
        let who_len = clause.chars().take_while(|c| "ugoa".contains(*c)).count();
        let rest = &clause[who_len..];
        if rest.is_empty() {
            return Err("missing operator".into());
        }
        let mut chars = rest.chars().peekable();
        let mut any_op = false;
        while let Some(op) = chars.next() {
            if !"+-=".contains(op) {
                return Err(format!("unexpected {op:?}"));
            }
            any_op = true;
            while let Some(c) = chars.peek() {
                if "rwxXstugo".contains(*c) {
                    chars.next();
                } else {
                    break;
                }
            }
        }
        if !any_op {
            return Err("missing operator".into());
        }
    }
    Ok(())
}

const INSTRUCTIONS: [&str; 18] = [
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

/// Every key `RUN --mount` accepts (for "did you mean" hints).
const MOUNT_KEYS: &[&str] = &[
    "type",
    "target",
    "dst",
    "destination",
    "source",
    "src",
    "from",
    "ro",
    "readonly",
    "rw",
    "readwrite",
    "id",
    "sharing",
    "mode",
    "uid",
    "gid",
    "size",
    "required",
    "env",
];

fn suggest(word: &str) -> String {
    let best = INSTRUCTIONS
        .iter()
        .map(|i| (levenshtein(word, i), i))
        .min()
        .filter(|(d, _)| *d <= 2);
    match best {
        Some((_, i)) => format!(" (did you mean {}?)", i.to_uppercase()),
        None => String::new(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parsed `--flag=value` options of one instruction.
#[derive(Default)]
struct Flags(Vec<(String, String)>);

impl Flags {
    fn get(&self, k: &str) -> Option<&String> {
        self.0.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v)
    }
    fn all<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.0.iter().filter(move |(n, _)| n == k).map(|(_, v)| v)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Err carries the flag as written and the message.
fn parse_flags(raw: &[String], allowed: &[&str]) -> Result<Flags, (String, String)> {
    let mut out = Flags::default();
    for f in raw {
        let body = f.trim_start_matches("--");
        let (k, v) = match body.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (body.to_string(), "true".to_string()),
        };
        if !allowed.contains(&k.as_str()) {
            let hint = did_you_mean(&k, allowed.iter().copied());
            let hint = hint.replace("mean ", "mean --");
            return Err((format!("--{k}"), format!("unknown flag: --{k}{hint}")));
        }
        out.0.push((k, v));
    }
    Ok(out)
}

/// Longest chain of stages built from one another.
pub const MAX_STAGE_DEPTH: usize = 1000;
/// Most stages (FROM instructions) in one Dockerfile.
pub const MAX_STAGES: usize = 10_000;
/// Largest Dockerfile accepted.
pub const MAX_DOCKERFILE_BYTES: usize = 16 << 20;
/// Stack of the conversion thread: MAX_STAGE_DEPTH nested stage
/// conversions fit with room to spare (only touched pages are used).
const CONVERT_STACK: usize = 256 << 20;

/// Converts a Dockerfile into a build graph. Runs on a thread of its own
/// with a stack sized for the deepest conversion the limits allow.
pub fn convert(
    dockerfile: &[u8],
    opts: &ConvertOptions,
    images: &(dyn ImageResolver + Sync),
) -> Result<Converted, FrontendError> {
    let whole_file = |message: String| FrontendError {
        file: opts.filename.clone(),
        line: 0,
        source_line: String::new(),
        message,
        token: None,
    };
    if dockerfile.len() > MAX_DOCKERFILE_BYTES {
        return Err(whole_file(format!(
            "the Dockerfile is {} bytes; at most {MAX_DOCKERFILE_BYTES} are accepted",
            dockerfile.len()
        )));
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("kiln-convert".into())
            .stack_size(CONVERT_STACK)
            .spawn_scoped(scope, || convert_here(dockerfile, opts, images))
            .map_err(|e| whole_file(format!("starting the conversion thread: {e}")))?
            .join()
            .map_err(|_| whole_file("the Dockerfile conversion panicked".into()))?
    })
}

fn convert_here(
    dockerfile: &[u8],
    opts: &ConvertOptions,
    images: &dyn ImageResolver,
) -> Result<Converted, FrontendError> {
    let lines: Vec<String> = String::from_utf8_lossy(dockerfile)
        .lines()
        .map(str::to_string)
        .collect();
    let ast = parser::parse(dockerfile).map_err(|e| FrontendError {
        file: opts.filename.clone(),
        line: e.start_line,
        source_line: e
            .start_line
            .checked_sub(1)
            .and_then(|i| lines.get(i))
            .cloned()
            .unwrap_or_default(),
        message: e.message.clone(),
        token: None,
    })?;
    if let Some(syntax) = &ast.directives.syntax {
        check_syntax(syntax).map_err(|m| FrontendError {
            file: opts.filename.clone(),
            line: ast.directives.syntax_line,
            source_line: lines
                .get(ast.directives.syntax_line.saturating_sub(1))
                .cloned()
                .unwrap_or_default(),
            message: m,
            token: None,
        })?;
    }
    let mut ctx = Ctx {
        opts,
        images,
        builder: GraphBuilder::new(),
        lex: Lex::new(ast.escape),
        stages: Vec::new(),
        meta_args: Vec::new(),
        done: HashMap::new(),
        in_progress: HashSet::new(),
        warnings: Vec::new(),
        lines,
        context: None,
        context_paths: Some(Default::default()),
        current: 0,
    };
    for w in &ast.warnings {
        ctx.warn("NoEmptyContinuation", &w.short, w.start_line);
    }
    for node in &ast.children {
        if node.keyword == "from" {
            let flags = parse_flags(&node.flags, &["platform"])
                .map_err(|(flag, e)| ctx.err_at(node.start_line, &flag, format!("FROM: {e}")))?;
            let (base, name) = match node.args.as_slice() {
                [b] => (b.clone(), None),
                [b, kw, n] if kw.eq_ignore_ascii_case("as") => {
                    if kw != "AS" && kw != "as"
                        || (kw == "as") != (node.original.trim_start().starts_with("from"))
                    {
                        ctx.warn(
                            "FromAsCasing",
                            "'as' and 'FROM' keywords' casing do not match",
                            node.start_line,
                        );
                    }
                    if n.to_lowercase() != *n {
                        ctx.warn(
                            "StageNameCasing",
                            &format!("Stage name '{n}' should be lowercase"),
                            node.start_line,
                        );
                    }
                    let n = n.to_lowercase();
                    if !valid_stage_name(&n) {
                        return Err(ctx.err(node.start_line, format!("invalid name for build stage: {n:?}, name can't start with a number or contain symbols")));
                    }
                    if ctx
                        .stages
                        .iter()
                        .any(|s| s.name.as_deref() == Some(n.as_str()))
                    {
                        return Err(ctx.err(node.start_line, format!("duplicate stage name {n:?}")));
                    }
                    (b.clone(), Some(n))
                }
                _ => {
                    return Err(ctx.err(
                        node.start_line,
                        "FROM requires either one or three arguments",
                    ));
                }
            };
            if ctx.stages.len() >= MAX_STAGES {
                return Err(ctx.err(
                    node.start_line,
                    format!("more than {MAX_STAGES} stages in one Dockerfile"),
                ));
            }
            ctx.stages.push(StageDef {
                name,
                base,
                platform: flags.get("platform").cloned(),
                from_node: node.clone(),
                commands: Vec::new(),
            });
        } else if let Some(stage) = ctx.stages.last_mut() {
            stage.commands.push(node.clone());
        } else if node.keyword == "arg" {
            for w in &node.args {
                let (k, v) = match w.split_once('=') {
                    Some((k, v)) => {
                        let env = ctx.meta_env();
                        let v = ctx
                            .lex
                            .process_word(v, &env)
                            .map_err(|e| ctx.err(node.start_line, e.to_string()))?;
                        (k.to_string(), Some(v))
                    }
                    None => (w.clone(), None),
                };
                ctx.meta_args.push((k, v));
            }
        } else {
            return Err(ctx.err(
                node.start_line,
                format!(
                    "no build stage in current context: {} must come after FROM",
                    node.keyword.to_uppercase()
                ),
            ));
        }
    }
    if ctx.stages.is_empty() {
        return Err(ctx.err(0, "the Dockerfile has no FROM instruction"));
    }
    let target = match &opts.target {
        Some(t) => ctx.stage_named(t, usize::MAX).ok_or_else(|| {
            let names: Vec<String> = ctx.stages.iter().filter_map(|s| s.name.clone()).collect();
            ctx.err(
                0,
                format!(
                    "target stage {t:?} could not be found{} (stages: {})",
                    did_you_mean(t, names.iter().map(String::as_str)),
                    names.join(", ")
                ),
            )
        })?,
        None => ctx.stages.len() - 1,
    };
    let result = ctx.convert_stage(target)?;
    let mut warnings = std::mem::take(&mut ctx.warnings);
    if let Some(check) = &ast.directives.check {
        let (skip, error) = parse_check_directive(check);
        warnings.retain(|w| {
            !skip
                .iter()
                .any(|s| s == "all" || s.eq_ignore_ascii_case(&w.rule))
        });
        if error && let Some(w) = warnings.first() {
            return Err(ctx.err(
                w.line,
                format!(
                    "lint violation: {}: {} (# check=error=true)",
                    w.rule, w.message
                ),
            ));
        }
    }
    let (definition, scratch) = match &result.state {
        Some(s) => (ctx.builder.finish(s), false),
        None => (Default::default(), true),
    };
    Ok(Converted {
        definition,
        image: result.image,
        warnings,
        scratch,
        context_paths: ctx.context_paths.map(|p| p.into_iter().collect()),
    })
}

/// `# check=skip=RuleA,RuleB;error=true`
fn parse_check_directive(v: &str) -> (Vec<String>, bool) {
    let mut skip = Vec::new();
    let mut error = false;
    for part in v.split(';') {
        match part.trim().split_once('=') {
            Some(("skip", list)) => skip.extend(
                list.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
            ),
            Some(("error", b)) => error = b.trim() == "true",
            _ => {}
        }
    }
    (skip, error)
}

fn valid_stage_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// The source identifier of a resolved image: a registry image, or an image
/// in a client's OCI layout (already `oci-layout://...`).
fn image_source(pinned: &str) -> String {
    if pinned.starts_with("oci-layout://") {
        pinned.to_string()
    } else {
        format!("docker-image://{pinned}")
    }
}

/// `# syntax=` must name the built-in frontend (docker/dockerfile:1.x).
fn check_syntax(syntax: &str) -> Result<(), String> {
    let image = syntax.split('@').next().unwrap_or(syntax);
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (image, "latest"),
    };
    let name = name.trim_start_matches("docker.io/");
    // Every channel of Docker's own frontend (1.x, labs, master, experimental)
    // is served by the built-in one; an explicit major version other than 1 is not.
    let major = tag.split(['.', '-']).next().unwrap_or("");
    let tag_ok = !major.chars().all(|c| c.is_ascii_digit()) || major == "1";
    if (name == "docker/dockerfile" || name == "docker/dockerfile-upstream") && tag_ok {
        return Ok(());
    }
    Err(format!(
        "unsupported syntax {syntax:?}: kiln has a built-in Dockerfile 1.x frontend and does not run external frontend images"
    ))
}

#[cfg(test)]
mod tests {
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
        assert!(
            cfg.exposed_ports.contains_key("80/tcp") && cfg.exposed_ports.contains_key("53/udp")
        );
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
        let e = conv("FROM scratch\nCOPY ../x /x\n").unwrap_err();
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
    fn copy_from_sees_later_stages_and_finds_cycles() {
        // BuildKit resolves --from against every stage, not just earlier ones.
        let df = "FROM scratch AS a\nCOPY --from=b /y /y\nFROM scratch AS b\nCOPY y /y\n";
        let o = ConvertOptions {
            target: Some("a".into()),
            ..Default::default()
        };
        let c = convert(df.as_bytes(), &o, &NoImages).unwrap();
        let g = kiln_definition::Graph::from_definition(&c.definition).unwrap();
        assert_eq!(g.vertices.len(), 3, "context, copy in b, copy in a");
        let e = conv("FROM scratch AS s0\nCOPY --from=s0 /a /b\n").unwrap_err();
        assert!(
            e.message
                .contains("circular dependency detected on stage: s0"),
            "{e}"
        );
        let df = "FROM scratch AS s0\nCOPY --from=s2 f /\nFROM scratch AS s1\nCOPY --from=s0 f /\nFROM scratch AS s2\nCOPY --from=s1 f /\n";
        assert!(
            conv(df)
                .unwrap_err()
                .message
                .contains("circular dependency")
        );
        let e = conv("FROM scratch\nCOPY --from=3 /a /b\n").unwrap_err();
        assert!(e.message.contains("invalid stage index 3"), "{e}");
        // FROM only sees stages above it: a later name is an image.
        let o = ConvertOptions {
            target: Some("a".into()),
            ..Default::default()
        };
        let e = convert(b"FROM b AS a\nFROM scratch AS b\n", &o, &NoImages).unwrap_err();
        assert!(e.message.contains("b"), "the image b is resolved: {e}");
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
}

//! Dockerfile → build graph and image config, with Docker's semantics for
//! stages, ARG scoping, expansion and config-changing instructions.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_definition::image::{HealthConfig, History, Image};
use kiln_definition::text::{MAX_MESSAGE, bounded};
use kiln_definition::{GraphBuilder, OutputRef, pb};

use crate::parser::{self, Node};
use crate::shell::Lex;

mod args;
mod checks;
mod diagnostics;
mod files;
mod flags;
mod instructions;
mod run;
mod stage;

use args::*;
use checks::*;
use diagnostics::*;
use files::*;
pub use files::{clean_path, validate_symbolic_mode};
use flags::*;
use instructions::*;

pub const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// The identifier of the build context source.
pub const CONTEXT_SOURCE: &str = "local://context";

/// Longest chain of stages built from one another.
pub const MAX_STAGE_DEPTH: usize = 1000;
/// Most stages (FROM instructions) in one Dockerfile.
pub const MAX_STAGES: usize = 10_000;
/// Largest Dockerfile accepted.
pub const MAX_DOCKERFILE_BYTES: usize = 16 << 20;
/// Stack of the conversion thread: MAX_STAGE_DEPTH nested stage
/// conversions fit with room to spare (only touched pages are used).
const CONVERT_STACK: usize = 256 << 20;
/// Largest build graph a Dockerfile may make (encoded ops): a 16 MiB
/// Dockerfile of ordinary steps makes a few MiB.
pub const MAX_GRAPH_BYTES: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}", place(file, *line), bounded(message, MAX_MESSAGE), snippet(*line, source_line, token.as_deref()))]
pub struct FrontendError {
    pub file: String,
    /// 1-based; 0 when the error is about the whole file.
    pub line: usize,
    pub source_line: String,
    pub message: String,
    /// The word on the line the error is about; shown with a caret under it.
    pub token: Option<String>,
}

/// `file:line: `, or `file: ` for an error about the whole file.
fn place(file: &str, line: usize) -> String {
    if line == 0 {
        format!("{file}: ")
    } else {
        format!("{file}:{line}: ")
    }
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
    /// Several platforms are built: step labels name the platform.
    pub multi_platform: bool,
    /// `--no-cache-filter`: stages whose steps run even when cached.
    pub no_cache_stages: Vec<String>,
    /// `--add-host`: (host, ip) entries for every RUN step's /etc/hosts.
    pub extra_hosts: Vec<(String, String)>,
    /// The context's .dockerignore patterns (for CopyIgnoredFile).
    pub dockerignore: Vec<String>,
    /// `--shm-size` in bytes (0: the default).
    pub shm_size: i64,
    /// `--ulimit`: (name, soft, hard) for every RUN step.
    pub ulimits: Vec<(String, i64, i64)>,
    /// `--label K=V`: labels set on the result's image config.
    pub labels: BTreeMap<String, String>,
    /// `--network`: the network of RUN steps that do not choose one
    /// (BuildKit's force-network-mode: none, host or default).
    pub default_network: Option<String>,
    /// `--check`: report every violation instead of failing on the first
    /// under `# check=error=true`.
    pub check_only: bool,
    /// `--attest type=sbom,scan-stage=true`: scan every built stage, as if
    /// each set `BUILDKIT_SBOM_SCAN_STAGE=true`.
    pub sbom_scan_stages: bool,
    /// `scan-context=true`: scan the build context.
    pub sbom_scan_context: bool,
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
            multi_platform: false,
            no_cache_stages: Vec::new(),
            extra_hosts: Vec::new(),
            dockerignore: Vec::new(),
            shm_size: 0,
            ulimits: Vec::new(),
            labels: BTreeMap::new(),
            default_network: None,
            check_only: false,
            sbom_scan_stages: false,
            sbom_scan_context: false,
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
    /// The stages besides the target whose filesystems the SBOM covers too
    /// (`BUILDKIT_SBOM_SCAN_STAGE`): name and final state (None: scratch).
    /// Only stages the target is built from, as in BuildKit.
    pub sbom_stages: Vec<(String, Option<OutputRef>)>,
    /// `BUILDKIT_SBOM_SCAN_CONTEXT` in the target: the SBOM covers the
    /// build context as well.
    pub sbom_context: bool,
    /// `--build-arg`s no ARG of the build declares (sorted).
    pub unused_build_args: Vec<String>,
}

/// BuildKit's SBOM switches: ARGs that are not variables.
pub(crate) const SBOM_SCAN_STAGE: &str = "BUILDKIT_SBOM_SCAN_STAGE";
pub(crate) const SBOM_SCAN_CONTEXT: &str = "BUILDKIT_SBOM_SCAN_CONTEXT";
pub(crate) const SBOM_SCAN_ARGS: [&str; 2] = [SBOM_SCAN_STAGE, SBOM_SCAN_CONTEXT];

/// Whether an SBOM switch's value turns scanning on for `stage`: a boolean,
/// or a comma-separated list of stage names (BuildKit's isEnabledForStage).
fn sbom_enabled_for(stage: &str, value: &str) -> bool {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
        "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
        list => list.split(',').any(|s| s == stage),
    }
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
    /// The variables RUN and expansion see, in the order they were set:
    /// the image's ENV plus the ARGs with a value, the last set winning
    /// (BuildKit keeps both in its LLB state; a stage built FROM this one
    /// inherits them).
    /// Shared, so expanding a word never copies it; changed copy-on-write.
    run_env: std::sync::Arc<Vec<(String, String)>>,
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
    /// Per converted stage: (scan the stage, scan the context) for the SBOM.
    sbom_scans: HashMap<usize, (bool, bool)>,
    /// ARG names declared globally or in a converted stage: the build args
    /// nothing declares are reported as not consumed.
    declared_args: HashSet<String>,
    /// The .dockerignore matcher, when there are patterns and none re-include
    /// (as BuildKit: exclusions make the rule undecidable statically).
    ignore: Option<kiln_context::dockerignore::Matcher>,
}

struct StageState {
    result: StageResult,
    args: Vec<(String, Option<String>)>,
    cmd_set: bool,
    platform: Platform,
    /// BuildKit's step labels, `[label index/total] `: the label is the
    /// platform (multi-platform builds) and the stage's name (Dockerfiles
    /// of several stages); the total counts FROM an image, ADD, COPY, RUN
    /// and WORKDIR.
    step_label: String,
    step_index: usize,
    step_total: usize,
}

impl StageState {
    /// `text` as the progress shows it: with the stage's next step label.
    fn step_name(&mut self, text: &str) -> String {
        if self.step_total == 0 {
            return text.to_string();
        }
        self.step_index += 1;
        let width = self.step_total.to_string().len();
        format!(
            "[{}{:>width$}/{}] {text}",
            self.step_label, self.step_index, self.step_total
        )
    }

    /// Variables visible to expansion and to RUN.
    fn expansion_env(&self) -> std::sync::Arc<Vec<(String, String)>> {
        self.result.run_env.clone()
    }
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

    /// Whether the current stage's steps ignore the cache (`--no-cache`, or
    /// `--no-cache-filter` naming it).
    fn ignores_cache(&self) -> bool {
        self.opts.no_cache
            || self.stages[self.current].name.as_ref().is_some_and(|n| {
                self.opts
                    .no_cache_stages
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(n))
            })
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
    /// What BuildKit checks in every stage, built or not: each
    /// instruction's flags, and that each base name (expanded with the
    /// global ARGs) is a stage, `scratch`, a named context or a valid image
    /// reference.
    fn validate_all_stages(&self) -> Result<(), FrontendError> {
        let meta = self.meta_env();
        for (idx, stage) in self.stages.iter().enumerate() {
            for node in &stage.commands {
                parse_flags(&node.flags, allowed_flags(&node.keyword)).map_err(|(flag, e)| {
                    self.err_at(
                        node.start_line,
                        &flag,
                        format!("{}: {e}", node.keyword.to_uppercase()),
                    )
                })?;
            }
            let Ok(base) = self.lex.process_word(&stage.base, &meta) else {
                continue;
            };
            if base == "scratch"
                || self.named_context(&base).is_some()
                || self.stage_named_exactly(&base, idx).is_some()
            {
                continue;
            }
            if base.is_empty() {
                return Err(self.err(
                    stage.from_node.start_line,
                    format!("base name ({}) should not be blank", stage.base),
                ));
            }
            if !valid_image_reference(&base) {
                return Err(self.err(
                    stage.from_node.start_line,
                    format!("failed to parse stage name {base:?}: invalid reference format"),
                ));
            }
        }
        Ok(())
    }

    /// The first word of a Dockerfile line as written (for carets), or
    /// `fallback` when the line is not there.
    fn first_word_of_line(&self, line: usize, fallback: &str) -> String {
        self.lines
            .get(line.saturating_sub(1))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or(fallback)
            .to_string()
    }

    /// The state of an image named by `--from` or a mount's `from=`:
    /// resolved for the platform and loaded by a source op.
    fn image_state(
        &mut self,
        reference: &str,
        platform: &Platform,
        line: usize,
        loc: &str,
    ) -> Result<OutputRef, FrontendError> {
        let (pinned, _) = self
            .images
            .resolve(reference, platform)
            .map_err(|e| self.err_at(line, reference, e))?;
        Ok(self.image_source_op(&pinned, platform, loc))
    }

    /// The source op that loads a resolved image (`pinned`) for `platform`.
    fn image_source_op(&mut self, pinned: &str, platform: &Platform, loc: &str) -> OutputRef {
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: image_source(pinned),
                attrs: vec![],
            })),
            platform: Some(platform.to_pb()),
            ..Default::default()
        };
        self.builder
            .add(&op, &format!("[internal] load {pinned}"), loc)
    }

    /// The stage a name refers to among the first `before` stages: the last
    /// one so named (a later duplicate replaces an earlier one, as in
    /// BuildKit). Stage names are stored lower-case; `COPY --from`, mounts
    /// and `--target` match in any case.
    fn stage_named(&self, name: &str, before: usize) -> Option<usize> {
        self.stage_named_exactly(&name.to_lowercase(), before)
    }

    /// As `stage_named`, but with the name as written: `FROM Base` does not
    /// find `AS Base` (stored as `base`) in BuildKit and is an image name.
    fn stage_named_exactly(&self, name: &str, before: usize) -> Option<usize> {
        let limit = before.min(self.stages.len());
        self.stages[..limit]
            .iter()
            .rposition(|s| s.name.as_deref() == Some(name))
    }

    /// The stage `COPY --from=` or `--mount from=` names: a stage name or
    /// index, which must come before the current stage (current BuildKit;
    /// v0.8 silently used that stage's base image instead).
    fn copy_from_stage(&self, name: &str, line: usize) -> Result<Option<usize>, FrontendError> {
        let idx = match name.parse::<i64>() {
            Ok(i) if i < 0 || i as usize >= self.stages.len() => {
                return Err(self.err_at(line, name, format!("invalid stage index {i}")));
            }
            Ok(i) => i as usize,
            Err(_) => match self.stage_named(name, usize::MAX) {
                Some(i) => i,
                None => return Ok(None),
            },
        };
        let current = self.stages[self.current]
            .name
            .clone()
            .unwrap_or_else(|| self.current.to_string());
        if idx == self.current {
            return Err(self.err_at(
                line,
                name,
                format!("circular dependency detected on stage: {current}"),
            ));
        }
        if idx > self.current {
            return Err(self.err_at(
                line,
                name,
                format!(
                    "cannot copy from stage {name:?}, it needs to be defined before current stage {current:?}"
                ),
            ));
        }
        Ok(Some(idx))
    }
}

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
        sbom_scans: HashMap::new(),
        declared_args: HashSet::new(),
        ignore: (!opts.dockerignore.is_empty())
            .then(|| kiln_context::dockerignore::Matcher::new(&opts.dockerignore).ok())
            .flatten()
            .filter(|m| !m.has_exclusions()),
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
                        // Allowed (the later one wins), as in BuildKit.
                        ctx.warn(
                            "DuplicateStageName",
                            &format!("Duplicate stage name {n:?}, stage names should be unique"),
                            node.start_line,
                        );
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
                ctx.declared_args.insert(k.clone());
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
    ctx.validate_all_stages()?;
    ctx.check_whole_file();
    // Every instruction, global ones and every stage's (as BuildKit parses them).
    ctx.check_descriptions(&ast.children);
    let target = match &opts.target {
        Some(t) => ctx.stage_named(t, usize::MAX).ok_or_else(|| {
            let names: Vec<String> = ctx.stages.iter().filter_map(|s| s.name.clone()).collect();
            let known = if names.is_empty() {
                "the Dockerfile names no stage (FROM ... AS NAME)".to_string()
            } else {
                format!("stages: {}", names.join(", "))
            };
            ctx.err(
                0,
                format!(
                    "target stage {t:?} could not be found{} ({known})",
                    did_you_mean(t, names.iter().map(String::as_str)),
                ),
            )
        })?,
        None => ctx.stages.len() - 1,
    };
    let mut result = ctx.convert_stage(target)?;
    // As BuildKit: --label goes on the final image, over the Dockerfile's.
    for (k, v) in &opts.labels {
        result.image.config.labels.insert(k.clone(), v.clone());
    }
    let mut warnings = std::mem::take(&mut ctx.warnings);
    // Experimental rules count only when the directive enables them.
    let experimental = ast
        .directives
        .check
        .as_deref()
        .map(parse_experimental)
        .unwrap_or_default();
    warnings.retain(|w| {
        w.rule != "InvalidDefinitionDescription"
            || experimental
                .iter()
                .any(|e| e == "all" || e.eq_ignore_ascii_case(&w.rule))
    });
    if let Some(check) = &ast.directives.check {
        let (skip, error) = parse_check_directive(check);
        warnings.retain(|w| {
            !skip
                .iter()
                .any(|s| s == "all" || s.eq_ignore_ascii_case(&w.rule))
        });
        if error
            && !opts.check_only
            && let Some(w) = warnings.first()
        {
            let mut rules: Vec<&str> = warnings.iter().map(|w| w.rule.as_str()).collect();
            rules.sort();
            rules.dedup();
            return Err(ctx.err(
                w.line,
                format!(
                    "lint violation found for rules: {} (# check=error=true; first: {})",
                    rules.join(", "),
                    w.message
                ),
            ));
        }
    }
    let mut sbom_stages = Vec::new();
    let mut stage_ids: Vec<&usize> = ctx.done.keys().filter(|i| **i != target).collect();
    stage_ids.sort();
    for idx in stage_ids {
        if ctx.sbom_scans.get(idx).is_some_and(|s| s.0) {
            let name = ctx.stages[*idx]
                .name
                .clone()
                .unwrap_or_else(|| format!("stage-{idx}"));
            sbom_stages.push((name, ctx.done[idx].state.clone()));
        }
    }
    let sbom_context = ctx.sbom_scans.get(&target).is_some_and(|s| s.1);
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
        sbom_stages,
        sbom_context,
        unused_build_args: opts
            .build_args
            .keys()
            .filter(|k| {
                !ctx.declared_args.contains(*k)
                    && !PROXY_ARGS.contains(&k.as_str())
                    && !k.starts_with("BUILDKIT_")
                    && !matches!(k.as_str(), "SOURCE_DATE_EPOCH")
                    && !k.starts_with("TARGET")
                    && !k.starts_with("BUILD")
            })
            .cloned()
            .collect(),
    })
}

/// `# check=experimental=RuleA,RuleB` (or `all`).
fn parse_experimental(v: &str) -> Vec<String> {
    v.split(';')
        .filter_map(|part| part.trim().strip_prefix("experimental="))
        .flat_map(|list| list.split(',').map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .collect()
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
mod tests;

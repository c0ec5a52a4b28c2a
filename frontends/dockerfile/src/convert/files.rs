//! COPY and ADD: sources, destinations, owners, modes, git and URL sources.

use super::*;

impl Ctx<'_> {
    pub(super) fn file_op(
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
        if self.ignores_cache() {
            self.builder.set_ignore_cache(&r.digest);
        }
        r
    }

    pub(super) fn copy(
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
        // Several sources to a destination without a trailing slash are
        // copied to it one after another (BuildKit: one copy per source; the
        // last file wins, directories merge), not refused as the docs say.
        let chown = match flags.get("chown") {
            Some(c) => {
                let c = ex(self, c)?;
                // An empty side of `user:group` is id 0 (`--chown=1000:` is
                // 1000:0 in BuildKit); no group at all means the user's.
                let or_root = |s: &str| {
                    if s.is_empty() {
                        "0".to_string()
                    } else {
                        s.to_string()
                    }
                };
                let (u, g) = match c.split_once(':') {
                    Some((u, g)) => (or_root(u), or_root(g)),
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
                    Ok(v) if v <= 0o7777 => (Some(v), String::new()),
                    Ok(_) => {
                        return Err(
                            self.err(line, format!("invalid chmod {m:?}: mode out of range"))
                        );
                    }
                    Err(_) => {
                        validate_symbolic_mode(&m)
                            .map_err(|e| self.err(line, format!("invalid chmod {m:?}: {e}")))?;
                        (None, m)
                    }
                }
            }
            None => (None, String::new()),
        };
        let mut excludes = Vec::new();
        for e in flags.all("exclude") {
            excludes.push(ex(self, e)?);
        }
        let parents = flags.get("parents").is_some_and(|v| v != "false");
        // --link: the copy is made on an empty tree, independent of the
        // stage so far, then stacked onto it (a merge), as in BuildKit: its
        // cache key and layer do not depend on the layers below.
        // With --chmod the copy is a plain one, as current BuildKit does
        // (convert_copy.go: the merge is used only when chmod is empty).
        let link = flags.get("link").is_some_and(|v| v != "false") && flags.get("chmod").is_none();
        let below = if link { None } else { st.result.state.clone() };
        // --from is never expanded (BuildKit refuses variables there).
        let from = match flags.get("from") {
            Some(f)
                if self
                    .lex
                    .process_word(f, &Vec::<(String, String)>::new())
                    .ok()
                    .as_ref()
                    != Some(f) =>
            {
                return Err(self.err_at(line, f, "variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround"));
            }
            f => f.cloned(),
        };
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
                    mode: mode.unwrap_or(0o644),
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
                        None => (
                            self.image_state(f, &st.platform, line, &self.loc(node))?,
                            format!("--from={f} "),
                        ),
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
                        self.check_ignored_source(src, node.keyword == "add", node.start_line);
                    }
                    (self.context(), String::new())
                }
            };
            let base_present = below.is_some();
            let src_idx = if base_present { 1 } else { 0 };
            extra.push(source);
            for s in &non_heredoc {
                if is_remote(s) && !is_add {
                    return Err(self.err(line, format!("COPY {s}: source can't be a URL for COPY")));
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
                    // BuildKit's Dockerfile frontend: a wildcard matching
                    // nothing is not an error.
                    allow_empty_wildcard: true,
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
            let shown = st.step_name(&desc);
            let state = self.file_op(below, extra, actions, &shown, node, &st.platform);
            st.result.state = Some(self.stack_link(st, state, link, &shown, node));
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
        let shown = st.step_name(&desc);
        let state = self.file_op(below, extra, actions, &shown, node, &st.platform);
        st.result.state = Some(self.stack_link(st, state, link, &shown, node));
        commit(&mut st.result.image, format!("{desc} # buildkit"), true);
        Ok(())
    }

    /// Stacks a `--link` copy (made on an empty tree) onto the stage: a
    /// merge op; on an empty stage the copy is the stage. A copy made
    /// without --link is already on the stage and returned as is.
    fn stack_link(
        &mut self,
        st: &StageState,
        copy: OutputRef,
        link: bool,
        desc: &str,
        node: &Node,
    ) -> OutputRef {
        let Some(base) = st.result.state.clone().filter(|_| link) else {
            return copy;
        };
        let op = pb::Op {
            inputs: [&base, &copy]
                .iter()
                .map(|r| pb::Input {
                    digest: r.digest.to_string(),
                    index: r.index,
                })
                .collect(),
            op: Some(pb::op::Op::Merge(pb::MergeOp { inputs: vec![0, 1] })),
            platform: Some(st.platform.to_pb()),
        };
        self.builder
            .add(&op, &format!("{desc} (link)"), &self.loc(node))
    }
}

pub(super) fn user_chown(user: &str) -> Option<pb::ChownOpt> {
    if user.is_empty() {
        return None;
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    Some(pb::ChownOpt {
        user: u.into(),
        group: g.into(),
    })
}

pub(super) fn parse_heredoc_src(s: &str) -> String {
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

pub(super) fn is_remote(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || parse_git_ref(s).is_some()
}

/// A git repository named in `ADD`: remote, ref and subdirectory.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct GitRef {
    pub(super) remote: String,
    pub(super) reference: String,
    pub(super) subdir: String,
}

pub(super) fn is_commit_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Recognises git sources the way BuildKit does: `git://`, `ssh://`,
/// scp-like `git@host:path`, `github.com/...`, and http(s) URLs whose path
/// ends in `.git`; the ref and subdirectory come from `#ref:subdir` or the
/// newer `?ref=..&subdir=..` query.
pub(super) fn parse_git_ref(s: &str) -> Option<GitRef> {
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

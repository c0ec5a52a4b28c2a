//! The instructions that change the image config (ENV, CMD, USER, HEALTHCHECK, ...).

use super::*;

impl Ctx<'_> {
    pub(super) fn dispatch(
        &mut self,
        st: &mut StageState,
        node: &Node,
    ) -> Result<(), FrontendError> {
        self.check_instruction(st, node);
        let line = node.start_line;
        let env = st.expansion_env();
        let expand = |ctx: &Ctx, s: &str| -> Result<String, FrontendError> {
            ctx.lex
                .process_word(s, &env)
                .map_err(|e| ctx.err(line, e.to_string()))
        };
        let flags =
            parse_flags(&node.flags, allowed_flags(&node.keyword)).map_err(|(flag, e)| {
                self.err_at(line, &flag, format!("{}: {e}", node.keyword.to_uppercase()))
            })?;
        let img = &mut st.result.image;
        match node.keyword.as_str() {
            "env" => {
                let mut parts = Vec::new();
                let mut updates = Vec::new();
                for kv in node.args.chunks(3) {
                    if kv[0].is_empty() {
                        return Err(self.err(line, "ENV names can not be blank"));
                    }
                    let key = expand(self, &kv[0])?;
                    let value = expand(self, &kv[1])?;
                    parts.push(format!("{key}={value}"));
                    updates.push((key, value));
                }
                for (k, v) in updates {
                    if is_secret_name(&k) {
                        self.warn(
                            "SecretsUsedInArgOrEnv",
                            &format!(
                                "Do not use ARG or ENV instructions for sensitive data (ENV {k:?})"
                            ),
                            line,
                        );
                    }
                    set_env(&mut img.config.env, &k, &v);
                    add_or_replace(&mut st.result.run_env, &k, &v)
                        .map_err(|e| self.err(line, e))?;
                }
                commit(img, format!("ENV {}", parts.join(" ")), false);
            }
            "label" => {
                let mut parts = Vec::new();
                for kv in node.args.chunks(3) {
                    if kv[0].is_empty() {
                        return Err(self.err(line, "LABEL names can not be blank"));
                    }
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
                // BuildKit records it as the image's author, not as a label.
                img.author = m.clone();
                commit(img, format!("MAINTAINER {m}"), false);
            }
            "workdir" => {
                let arg = node
                    .args
                    .first()
                    .ok_or_else(|| self.err(line, "WORKDIR requires exactly one argument"))?;
                let written = expand(self, arg)?;
                // The config keeps an absolute path as written (BuildKit's
                // dispatchWorkdir); a relative one is joined and cleaned.
                let (stored, wd) = if written.starts_with('/') {
                    (written.clone(), clean_path(&written))
                } else {
                    self.warn("WorkdirRelativePath", &format!("Relative workdir {written:?} can have unexpected results if the base image changes"), line);
                    let joined = clean_path(&format!("/{}/{}", img.config.working_dir, written));
                    (joined.clone(), joined)
                };
                img.config.working_dir = stored;
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
                    let shown = st.step_name(&format!("WORKDIR {wd}"));
                    st.result.state = Some(self.file_op(
                        st.result.state.clone(),
                        vec![],
                        vec![action],
                        &shown,
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
                    // The command line is one word, empty for a bare `CMD`.
                    let mut v = shell_of(img);
                    v.push(node.args.join(" "));
                    v
                };
                let text = json_list(&args);
                // An empty list is no value at all in BuildKit's config (Go's
                // omitempty), though it still clears CMD below.
                let args = Some(args).filter(|a| !a.is_empty());
                if node.keyword == "cmd" {
                    img.config.cmd = args;
                    st.cmd_set = true;
                    commit(img, format!("CMD {text}"), false);
                } else {
                    img.config.entrypoint = args;
                    if !st.cmd_set {
                        img.config.cmd = None;
                    }
                    commit(img, format!("ENTRYPOINT {text}"), false);
                }
            }
            "expose" => {
                let mut ports = Vec::new();
                // The expanded words are split again: `EXPOSE $PORTS` with
                // PORTS="80 443/udp" exposes two ports, as in BuildKit.
                for a in &node.args {
                    let words = self
                        .lex
                        .process_words(a, &env)
                        .map_err(|e| self.err(line, e.to_string()))?;
                    for p in words {
                        for port in expose_ports(&p).map_err(|e| self.err(line, e))? {
                            ports.push(port);
                        }
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
                if node.args.is_empty() {
                    return Err(self.err(line, "VOLUME requires at least one argument"));
                }
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
                if !valid_stop_signal(&s) {
                    return Err(self.err(line, format!("Invalid signal: {s}")));
                }
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
                // The trigger is stored as written after the keyword,
                // trailing whitespace included.
                let text = node.original.trim_start().trim_end_matches(['\n', '\r']);
                let trigger = text[text.find(char::is_whitespace).unwrap_or(text.len())..]
                    .trim_start()
                    .to_string();
                img.config.on_build.push(trigger.clone());
                commit(img, format!("ONBUILD {trigger}"), false);
            }
            "arg" => {
                for word in &node.args {
                    // Only the value is expanded: current BuildKit (dockerfile
                    // 1.8) stopped expanding the name, which v0.8 did.
                    let (name, default) = match word.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(expand(self, v)?)),
                        None => (word.clone(), None),
                    };
                    if name.is_empty() {
                        return Err(self.err(line, "ARG names can not be blank"));
                    }
                    self.declared_args.insert(name.clone());
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
                    // The SBOM switches steer the scan and are no variables
                    // (BuildKit's nonEnvArgs).
                    if let Some(v) = &value
                        && !SBOM_SCAN_ARGS.contains(&name.as_str())
                    {
                        add_or_replace(&mut st.result.run_env, &name, v)
                            .map_err(|e| self.err(line, e))?;
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
                let written = self.first_word_of_line(line, other);
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

    pub(super) fn healthcheck(
        &self,
        node: &Node,
        flags: &Flags,
    ) -> Result<HealthConfig, FrontendError> {
        let line = node.start_line;
        let typ = node
            .args
            .first()
            .map(|s| s.to_uppercase())
            .unwrap_or_default();
        let mut hc = HealthConfig::default();
        match typ.as_str() {
            "NONE" => {
                // Flags before NONE are accepted and dropped, as in BuildKit.
                if node.args.len() > 1 {
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
                let written = self.first_word_of_line(line, other);
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
}

pub(super) fn shell_of(img: &Image) -> Vec<String> {
    if img.config.shell.is_empty() {
        DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
    } else {
        img.config.shell.clone()
    }
}

pub(super) fn commit(img: &mut Image, created_by: String, with_layer: bool) {
    img.history.push(History {
        created: None,
        created_by,
        comment: HISTORY_COMMENT.into(),
        empty_layer: !with_layer,
    });
}

pub(super) fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub(super) fn expose_ports(spec: &str) -> Result<Vec<String>, String> {
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
pub(super) fn parse_duration(s: &str) -> Option<i64> {
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

/// Signals Docker accepts for STOPSIGNAL: a number, or a name with or
/// without SIG (any case), as moby's signal.ParseSignal.
pub(super) fn valid_stop_signal(s: &str) -> bool {
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "UNUSED", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU",
        "XFSZ",
    ];
    if let Ok(n) = s.parse::<u32>() {
        return n != 0;
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if NAMES.contains(&name) {
        return true;
    }
    // RTMIN, RTMIN+n, RTMAX-n
    let rt = |base: &str| -> bool {
        name == base
            || name
                .strip_prefix(base)
                .and_then(|r| r.strip_prefix(['+', '-']))
                .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n <= 15))
    };
    rt("RTMIN") || rt("RTMAX")
}

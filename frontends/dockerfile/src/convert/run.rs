//! RUN: the command, its mounts, network and security mode.

use super::*;

impl Ctx<'_> {
    pub(super) fn run(
        &mut self,
        st: &mut StageState,
        node: &Node,
        flags: &Flags,
    ) -> Result<(), FrontendError> {
        let line = node.start_line;
        let img = &st.result.image;
        let env_for_expand = st.expansion_env();
        let mut script: Option<(String, String)> = None;
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
                // A shebang script is a file of its own (mode 0755, made on an
                // empty tree) mounted read-only at /dev/pipes/ and run
                // directly, as BuildKit's dispatchRun does.
                script = Some((h.name.clone(), body));
                vec![format!("/dev/pipes/{}", h.name)]
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
        // Env: the stage's ordered environment (ENV and ARG values, the last
        // set winning), then the proxy build args under both spellings as
        // BuildKit's ProxyEnv passes them, whether declared or not (never
        // ALL_PROXY, which that BuildKit does not predefine).
        let mut env: Vec<String> = st
            .result
            .run_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for proxy in ["HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY"] {
            let Some(value) = self
                .opts
                .build_args
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(proxy))
                .map(|(_, v)| v)
            else {
                continue;
            };
            // They win over an ENV or ARG of the same name.
            for name in [proxy.to_string(), proxy.to_lowercase()] {
                env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(name.as_str()));
                env.push(format!("{name}={value}"));
            }
        }
        let chosen = flags
            .get("network")
            .map(String::as_str)
            .or(self.opts.default_network.as_deref());
        let network = match chosen {
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
        if let Some((name, body)) = script.take() {
            let file = pb::FileAction {
                action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                    path: format!("/{name}"),
                    mode: 0o755,
                    data: body.into_bytes(),
                    chown: None,
                })),
            };
            let platform = st.platform.clone();
            let state = self.file_op(
                None,
                vec![],
                vec![file],
                &format!("heredoc {name}"),
                node,
                &platform,
            );
            inputs.push(pb::Input {
                digest: state.digest.to_string(),
                index: state.index,
            });
            mounts.push(pb::Mount {
                input: inputs.len() as i64 - 1,
                selector: "/".into(),
                dest: "/dev/pipes/".into(),
                output: -1,
                readonly: true,
                ..Default::default()
            });
        }
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
            clean_path(&img.config.working_dir)
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
                    extra_hosts: self
                        .opts
                        .extra_hosts
                        .iter()
                        .map(|(host, ip)| pb::HostIp {
                            host: host.clone(),
                            ip: ip.clone(),
                        })
                        .collect(),
                    shm_size: self.opts.shm_size,
                    ulimit: self
                        .opts
                        .ulimits
                        .iter()
                        .map(|(name, soft, hard)| pb::Ulimit {
                            name: name.clone(),
                            soft: *soft,
                            hard: *hard,
                        })
                        .collect(),
                }),
                mounts,
                network: network as i32,
                security: security as i32,
            })),
            platform: Some(st.platform.to_pb()),
        };
        let shown = st.step_name(node.original.trim());
        let r = self.builder.add(&op, &shown, &self.loc(node));
        if self.ignores_cache() {
            self.builder.set_ignore_cache(&r.digest);
        }
        st.result.state = Some(r);
        let mut created_by = String::from("RUN ");
        // History names the stage's declared ARGs with their values, as BuildKit's.
        let arg_env: Vec<String> = st
            .args
            .iter()
            .map(|(k, v)| {
                let value = st
                    .result
                    .run_env
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .or_else(|| v.clone())
                    .unwrap_or_default();
                format!("{k}={value}")
            })
            .collect();
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

    pub(super) fn parse_mount(
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
                "bind" => target = clean_path(&st.result.image.config.working_dir),
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
                    } else if !source.is_empty() {
                        source.rsplit('/').next().unwrap_or("").to_string()
                    } else {
                        // BuildKit: the id defaults to the target's base name.
                        m.dest.rsplit('/').next().unwrap_or("").to_string()
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
                    let stage = match named {
                        Some(_) => None,
                        None => self.copy_from_stage(f, line)?,
                    };
                    match stage {
                        Some(i) => self.convert_stage(i)?.state,
                        None => {
                            let f = match named {
                                Some(Err(image)) => image,
                                _ => f.clone(),
                            };
                            Some(self.image_state(&f, &st.platform, line, "")?)
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

pub(super) fn parse_size(s: &str) -> Option<i64> {
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

/// Every key `RUN --mount` accepts (for "did you mean" hints).
pub(super) const MOUNT_KEYS: &[&str] = &[
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

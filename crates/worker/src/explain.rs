//! Cache-miss explanations: each step that runs is compared with the
//! closest earlier step recorded here (same Dockerfile location, else the
//! same instruction), and the difference is said in words: the command, an
//! ARG/ENV value, the base image digest, the context files whose content
//! changed, a mount, an earlier step — or that nothing like it was built.
//! What a step was made from (its fingerprint) is stored with its record.

use std::collections::{BTreeMap, BTreeSet};

use kiln_definition::{Vertex, pb};
use kiln_solver::Resolved;
use serde::{Deserialize, Serialize};

use crate::{Output, Worker};

/// Context entries remembered per input: enough to name the changed files
/// of any real COPY, bounded for a huge one.
const MAX_FILES: usize = 20_000;
/// How long a value is shown before it is cut.
const MAX_SHOWN: usize = 60;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub name: String,
    pub location: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub user: String,
    /// Network and security modes, and each mount (its kind and options).
    #[serde(default)]
    pub options: Vec<String>,
    /// A digest of the op itself: anything else about it that changed.
    pub op: String,
    pub inputs: Vec<InputPrint>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputPrint {
    pub key: String,
    /// Context files the step read, with a short hash of each.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

fn shown(s: &str) -> String {
    if s.chars().count() <= MAX_SHOWN {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX_SHOWN).collect();
        format!("{cut:?}…")
    }
}

/// A step's name without its progress label (`[stage 2/5] RUN x` → `RUN x`):
/// the label numbers steps, so inserting one elsewhere changes it.
fn without_step_label(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix('[')
        && let Some((label, after)) = rest.split_once("] ")
        && let Some((_, count)) = label.rsplit_once([' ', '[']).or(Some(("", label)))
        && let Some((i, n)) = count.split_once('/')
        && !i.trim().is_empty()
        && i.trim().chars().all(|c| c.is_ascii_digit())
        && !n.is_empty()
        && n.chars().all(|c| c.is_ascii_digit())
    {
        return after;
    }
    name
}

/// What `v` is made from, with its inputs as resolved.
pub(crate) fn fingerprint(v: &Vertex, inputs: &[Resolved<Output>]) -> Fingerprint {
    let mut fp = Fingerprint {
        name: without_step_label(v.name()).to_string(),
        location: v.meta.location.clone(),
        op: v.digest.to_string(),
        ..Default::default()
    };
    // The context paths each input is read at.
    let mut selectors: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    match &v.op.op {
        Some(pb::op::Op::Exec(e)) => {
            if let Some(m) = &e.meta {
                fp.args = m.args.clone();
                // Values are kept as short hashes: an ARG someone used for
                // a token must not sit in metadata.db in the clear.
                fp.env = m.env.iter().map(|e| hashed_env(e)).collect();
                fp.cwd = m.cwd.clone();
                fp.user = m.user.clone();
            }
            fp.options.push(format!("network={:?}", e.network()));
            fp.options.push(format!("security={:?}", e.security()));
            for m in &e.mounts {
                fp.options.push(format!(
                    "mount {:?} {} (source {:?}, readonly={}, id={:?}, sharing={:?}, secret={:?}, mode={:o}, uid={}, gid={})",
                    m.r#type(),
                    m.dest,
                    m.selector,
                    m.readonly,
                    m.cache_id,
                    m.sharing(),
                    m.secret_id,
                    m.mode,
                    m.uid,
                    m.gid
                ));
                if m.input >= 0 {
                    selectors
                        .entry(m.input as usize)
                        .or_default()
                        .push(if m.selector.is_empty() {
                            ".".into()
                        } else {
                            m.selector.clone()
                        });
                }
            }
        }
        Some(pb::op::Op::File(f)) => {
            for a in &f.actions {
                if let Some(pb::file_action::Action::Copy(c)) = &a.action {
                    selectors
                        .entry(c.source_input.max(0) as usize)
                        .or_default()
                        .extend(c.src.iter().cloned());
                }
            }
        }
        _ => {}
    }
    for (i, r) in inputs.iter().enumerate() {
        let mut files = BTreeMap::new();
        if let Output::Context(ctx) = &r.output {
            for s in selectors.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
                if files.len() >= MAX_FILES {
                    break;
                }
                files.extend(ctx.mirror.entry_hashes(s, MAX_FILES - files.len()));
            }
        }
        fp.inputs.push(InputPrint {
            key: r.key.clone(),
            files,
        });
    }
    fp
}

impl Worker {
    /// Why step `fp` was not in the cache, against the closest earlier one.
    pub(crate) fn explain_miss(&self, fp: &Fingerprint) -> String {
        let earlier = [
            (!fp.location.is_empty()).then(|| format!("loc:{}", fp.location)),
            Some(format!("name:{}", fp.name)),
        ]
        .into_iter()
        .flatten()
        .find_map(|n| self.meta.latest_fingerprint(&n).ok().flatten())
        .and_then(|(_, bytes)| serde_json::from_slice::<Fingerprint>(&bytes).ok());
        let Some(old) = earlier else {
            return "no earlier build of this step is in the cache".into();
        };
        let reasons = self.differences(&old, fp);
        if reasons.is_empty() {
            return "the step is as in an earlier build, whose result is no longer cached (pruned, or the cache was not used)".into();
        }
        reasons.join("; ")
    }

    fn differences(&self, old: &Fingerprint, new: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if old.name != new.name {
            out.push(format!(
                "the instruction changed (was {})",
                shown(&old.name)
            ));
        } else if old.args != new.args {
            out.push("the command changed".into());
        }
        out.extend(env_changes(&old.env, &new.env));
        if old.cwd != new.cwd {
            out.push(format!(
                "WORKDIR changed ({} → {})",
                shown(&old.cwd),
                shown(&new.cwd)
            ));
        }
        if old.user != new.user {
            out.push(format!(
                "USER changed ({} → {})",
                shown(&old.user),
                shown(&new.user)
            ));
        }
        if old.options != new.options {
            out.push("a mount or the network/security mode changed".into());
        }
        if old.inputs.len() != new.inputs.len() {
            out.push("the step's inputs changed".into());
        } else {
            for (o, n) in old.inputs.iter().zip(&new.inputs) {
                if o.key != n.key {
                    out.push(self.input_change(o, n));
                }
            }
        }
        if out.is_empty() && old.op != new.op {
            out.push("the instruction's options changed".into());
        }
        out
    }

    fn input_change(&self, old: &InputPrint, new: &InputPrint) -> String {
        if let (Some(a), Some(b)) = (
            old.key.strip_prefix("image:"),
            new.key.strip_prefix("image:"),
        ) {
            return format!("the base image changed ({a} → {b})");
        }
        if !old.files.is_empty() || !new.files.is_empty() {
            let changed: Vec<&str> = old
                .files
                .keys()
                .chain(new.files.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|p| old.files.get(*p) != new.files.get(*p))
                .map(String::as_str)
                .collect();
            if changed.is_empty() {
                return "the build context changed".into();
            }
            let mut list: Vec<String> = changed.iter().take(5).map(|p| p.to_string()).collect();
            if changed.len() > 5 {
                list.push(format!("and {} more", changed.len() - 5));
            }
            return format!("context files changed: {}", list.join(", "));
        }
        // Another step: name it, from what was stored when it ran.
        let name = self
            .meta
            .fingerprint(&new.key)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Fingerprint>(&b).ok())
            .map(|f| f.name);
        match name {
            Some(n) => format!("an earlier step changed ({})", shown(&n)),
            None => "an input changed".into(),
        }
    }

    /// Remembers what step `key` was made from, as the latest for its
    /// location and instruction.
    pub(crate) fn remember_fingerprint(&self, key: &str, fp: &Fingerprint) {
        let Ok(bytes) = serde_json::to_vec(fp) else {
            return;
        };
        let mut names = vec![format!("name:{}", fp.name)];
        if !fp.location.is_empty() {
            names.push(format!("loc:{}", fp.location));
        }
        if let Err(e) = self.meta.put_fingerprint(key, &bytes, &names) {
            tracing::warn!("recording the fingerprint of {key}: {e}");
        }
    }
}

/// `NAME=<short hash of the value>`.
fn hashed_env(entry: &str) -> String {
    let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
    let digest = kiln_definition::Digest::of(value.as_bytes());
    format!("{name}={}", &digest.hex()[..16])
}

/// ARG/ENV values added, removed or changed, by name (values are hashed).
fn env_changes(old: &[String], new: &[String]) -> Vec<String> {
    let split = |env: &[String]| -> BTreeMap<String, String> {
        env.iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    };
    let (o, n) = (split(old), split(new));
    let mut out = Vec::new();
    for k in o.keys().chain(n.keys()).collect::<BTreeSet<_>>() {
        match (o.get(k), n.get(k)) {
            (Some(a), Some(b)) if a != b => out.push(format!("ARG/ENV {k} changed")),
            (Some(_), None) => out.push(format!("ARG/ENV {k} is no longer set")),
            (None, Some(_)) => out.push(format!("ARG/ENV {k} is new")),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_labels_are_not_part_of_the_instruction() {
        assert_eq!(without_step_label("[2/5] RUN x"), "RUN x");
        assert_eq!(without_step_label("[builder  2/10] COPY a b"), "COPY a b");
        assert_eq!(
            without_step_label("[linux/amd64 stage-0 1/3] FROM x"),
            "FROM x"
        );
        assert_eq!(
            without_step_label("[internal] load build context"),
            "[internal] load build context"
        );
    }

    #[test]
    fn env_changes_name_each_variable_and_keep_no_value() {
        let h = |v: &[&str]| v.iter().map(|e| hashed_env(e)).collect::<Vec<_>>();
        let old = h(&["A=1", "B=2", "C=3", "TOKEN=hunter2"]);
        let new = h(&["A=1", "B=20", "D=4", "TOKEN=hunter2"]);
        assert!(old.iter().all(|e| !e.contains("hunter2")));
        assert_eq!(
            env_changes(&old, &new),
            vec![
                "ARG/ENV B changed".to_string(),
                "ARG/ENV C is no longer set".into(),
                "ARG/ENV D is new".into()
            ]
        );
        let long = "x".repeat(100);
        assert!(shown(&long).ends_with('…'));
    }
}

//! ARG and ENV: built-in and meta args, the variables expansion sees.

use super::*;

impl Ctx<'_> {
    pub(super) fn builtin_args(&self) -> Vec<(String, String)> {
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
    pub(super) fn meta_env(&self) -> Vec<(String, String)> {
        let mut env = self.builtin_args();
        for (k, v) in &self.meta_args {
            if let Some(v) = self.opts.build_args.get(k) {
                env.push((k.clone(), v.clone()));
            } else if let Some(v) = v {
                env.push((k.clone(), v.clone()));
            } else {
                // A global `ARG TARGETOS` without a value shadows the
                // automatic one: it has no value, as in BuildKit.
                env.retain(|(n, _)| n != k);
            }
        }
        env
    }
}

pub(super) fn set_env(env: &mut Vec<String>, key: &str, value: &str) {
    let entry = format!("{key}={value}");
    for e in env.iter_mut() {
        if e.split_once('=').map(|x| x.0).unwrap_or(e) == key {
            *e = entry;
            return;
        }
    }
    env.push(entry);
}

/// Sets a variable in an ordered environment the way BuildKit's LLB state
/// does: an existing entry is removed and the new one appended.
/// Largest environment a stage may hold (names and values). Linux gives
/// a process 2 MiB of arguments and environment together, so no RUN could
/// start with more; the bound keeps a Dockerfile from growing it without end.
pub(super) const MAX_STAGE_ENV: usize = 4 << 20;

/// Sets `key` in a stage's environment (the last set wins); Err when the
/// environment would pass [`MAX_STAGE_ENV`].
pub(super) fn add_or_replace(
    env: &mut std::sync::Arc<Vec<(String, String)>>,
    key: &str,
    value: &str,
) -> Result<(), String> {
    let env = std::sync::Arc::make_mut(env);
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
    let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if size > MAX_STAGE_ENV {
        return Err(format!(
            "the stage's environment grew past {} MiB",
            MAX_STAGE_ENV >> 20
        ));
    }
    Ok(())
}

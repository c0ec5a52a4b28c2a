//! Which daemon a command talks to. Several endpoints (a farm) can be given
//! with `--addr a,b,c`, `KILN_HOST` or `endpoints` in kilnctl.toml; a build
//! goes to one of them chosen by rendezvous hashing of (this machine, the
//! context directory, the Dockerfile), so the same project keeps landing on
//! the daemon whose local cache is warm for it, and moves to the next one
//! only when that daemon cannot be reached. Other commands use the first
//! endpoint that answers.

use std::path::{Path, PathBuf};

use kiln_client::{Client, ClientTls};
use kiln_digest::Digest;
use serde::Deserialize;

/// kilnctl.toml: `$KILN_CONFIG`, else `$XDG_CONFIG_HOME/kiln/kilnctl.toml`
/// (`~/.config/kiln/kilnctl.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub endpoints: Vec<String>,
    pub tls: FileTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// The endpoints and TLS settings in force.
#[derive(Debug, Default, Clone)]
pub struct Targets {
    pub addrs: Vec<String>,
    pub tls: ClientTls,
}

fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("kiln/kilnctl.toml"))
}

impl Targets {
    /// Flags win over the config file, field by field.
    pub fn resolve(addr: Option<&str>, flags: ClientTls) -> anyhow::Result<Targets> {
        let file = match config_path() {
            Some(p) if p.is_file() => {
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            }
            _ => FileConfig::default(),
        };
        let addrs: Vec<String> = match addr {
            Some(a) => a
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
            None => file.endpoints,
        };
        Ok(Targets {
            addrs,
            tls: ClientTls {
                ca: flags.ca.or(file.tls.ca),
                cert: flags.cert.or(file.tls.cert),
                key: flags.key.or(file.tls.key),
                server_name: flags.server_name.or(file.tls.server_name),
            },
        })
    }

    /// The endpoints in the order a build keyed `key` tries them.
    pub fn ranked(&self, key: &str) -> Vec<String> {
        let mut scored: Vec<(Digest, &String)> = self
            .addrs
            .iter()
            .map(|a| (Digest::of(format!("{key}\n{a}").as_bytes()), a))
            .collect();
        scored.sort_by(|x, y| y.0.as_str().cmp(x.0.as_str()));
        scored.into_iter().map(|(_, a)| a.clone()).collect()
    }

    /// The first endpoint (in `order`) that answers, with the errors of the
    /// ones that did not.
    pub async fn first_reachable(&self, order: &[String]) -> anyhow::Result<(String, Client)> {
        if let [only] = order {
            return Ok((
                only.clone(),
                kiln_client::connect_with(only, &self.tls).await?,
            ));
        }
        let mut errors = Vec::new();
        for a in order {
            match kiln_client::connect_with(a, &self.tls).await {
                Ok(c) => match c.info().await {
                    Ok(_) => return Ok((a.clone(), c)),
                    Err(e) => errors.push(format!("{a}: {e}")),
                },
                Err(e) => errors.push(e.to_string()),
            }
            eprintln!("note: {a} is unreachable; trying the next daemon");
        }
        anyhow::bail!("no daemon could be reached: {}", errors.join("; "))
    }
}

/// What a build is routed by: this machine, the context directory and the
/// Dockerfile.
pub fn route_key(context: &Path, dockerfile: &Path) -> String {
    let host = nix_hostname();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    format!(
        "{host}\n{}\n{}",
        canon(context).display(),
        canon(dockerfile).display()
    )
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_moves_little_when_a_daemon_goes() {
        let t = Targets {
            addrs: (0..5).map(|i| format!("tcp://kilnd-{i}:1234")).collect(),
            tls: ClientTls::default(),
        };
        let keys: Vec<String> = (0..200)
            .map(|i| format!("host\n/ctx/{i}\nDockerfile"))
            .collect();
        let first: Vec<String> = keys.iter().map(|k| t.ranked(k)[0].clone()).collect();
        // Stable, and spread over the daemons.
        assert_eq!(
            first,
            keys.iter()
                .map(|k| t.ranked(k)[0].clone())
                .collect::<Vec<_>>()
        );
        for a in &t.addrs {
            assert!(first.iter().filter(|f| *f == a).count() > 10, "{a}");
        }
        // Removing one daemon moves only the builds it had.
        let gone = t.addrs[2].clone();
        let fewer = Targets {
            addrs: t.addrs.iter().filter(|a| **a != gone).cloned().collect(),
            tls: ClientTls::default(),
        };
        for (k, f) in keys.iter().zip(&first) {
            if *f != gone {
                assert_eq!(&fewer.ranked(k)[0], f);
            }
        }
    }
}

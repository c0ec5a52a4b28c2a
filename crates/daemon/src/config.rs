//! kilnd.toml: the daemon's settings. Command-line flags override the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_ROOT: &str = "/var/lib/kiln";
pub const DEFAULT_ADDR: &str = "unix:///run/kiln/kilnd.sock";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory (snapshots, content, metadata, context mirrors).
    pub root: PathBuf,
    /// Listen addresses (`unix:///path`).
    pub addr: Vec<String>,
    /// Steps run at once; 0 means two per CPU core (see docs/decisions/0005).
    pub max_parallelism: usize,
    /// Group that may use the socket (its mode is 0660).
    pub group: Option<String>,
    /// OCI runtime binary for RUN steps (`runc`, `crun` or a path); none
    /// means the built-in sandbox.
    pub oci_runtime: Option<String>,
    /// Network for steps without `--network`: "host" (default) or "none".
    pub network: String,
    /// "auto" (overlayfs when it can be mounted, else copies), "overlayfs" or "native".
    pub snapshotter: String,
    /// Entitlements builds may ask for: "network.host", "security.insecure".
    pub allow_insecure_entitlements: Vec<String>,
    /// Registries (host:port) reached over plain HTTP; loopback ones always are.
    pub insecure_registries: Vec<String>,
    /// Per-registry settings, BuildKit's `[registry."host:port"]` tables.
    pub registry: std::collections::BTreeMap<String, RegistryHost>,
    /// Run (on a blocking thread) after every build: kilnd hands the
    /// allocator's free memory back to the system there.
    #[serde(skip)]
    pub after_build: Option<fn()>,
}

/// `[registry."host:port"]`: how to reach one registry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHost {
    /// Plain HTTP.
    pub http: bool,
    /// TLS without certificate verification.
    pub insecure: bool,
    /// PEM files with CA certificates to trust for this host.
    pub ca: Vec<PathBuf>,
    /// Hosts tried first when pulling from this registry.
    pub mirrors: Vec<String>,
}

impl Config {
    /// The registry client's settings, with CA files read.
    pub fn registry_config(&self) -> Result<kiln_registry::RegistryConfig, ConfigError> {
        let mut hosts = std::collections::HashMap::new();
        for (host, h) in &self.registry {
            let mut ca_pem = Vec::new();
            for path in &h.ca {
                ca_pem.push(std::fs::read(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?);
            }
            hosts.insert(
                host.clone(),
                kiln_registry::HostConfig {
                    http: h.http,
                    insecure: h.insecure,
                    ca_pem,
                    mirrors: h.mirrors.clone(),
                },
            );
        }
        Ok(kiln_registry::RegistryConfig {
            insecure: self.insecure_registries.clone(),
            hosts,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            addr: vec![DEFAULT_ADDR.to_string()],
            max_parallelism: 0,
            group: None,
            oci_runtime: None,
            network: "host".into(),
            snapshotter: "auto".into(),
            allow_insecure_entitlements: Vec::new(),
            insecure_registries: Vec::new(),
            registry: Default::default(),
            after_build: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn parallelism(&self) -> usize {
        if self.max_parallelism > 0 {
            self.max_parallelism
        } else {
            // Steps wait on I/O and on each other as often as they compute:
            // twice the cores keeps the CPUs busy (docs/decisions/0005).
            2 * std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let d = std::env::temp_dir().join(format!("kilnd-cfg-{}", std::process::id()));
        std::fs::write(&d, "root = \"/tmp/x\"\nmax_parallelism = 3\n").unwrap();
        let c = Config::load(&d).unwrap();
        assert_eq!(c.root, PathBuf::from("/tmp/x"));
        assert_eq!(c.parallelism(), 3);
        assert_eq!(c.addr, vec![DEFAULT_ADDR.to_string()]);
        std::fs::write(
            &d,
            "[registry.\"docker.io\"]\nmirrors = [\"127.0.0.1:5000\"]\n[registry.\"r.example:443\"]\ninsecure = true\n",
        )
        .unwrap();
        let c = Config::load(&d).unwrap();
        let rc = c.registry_config().unwrap();
        assert_eq!(rc.hosts["docker.io"].mirrors, vec!["127.0.0.1:5000"]);
        assert!(rc.hosts["r.example:443"].insecure);
        std::fs::write(&d, "[registry.\"x\"]\ncert = 1\n").unwrap();
        assert!(Config::load(&d).unwrap_err().to_string().contains("cert"));
        std::fs::write(&d, "rot = 1\n").unwrap();
        let e = Config::load(&d).unwrap_err().to_string();
        assert!(e.contains("rot"), "{e}");
        std::fs::remove_file(&d).unwrap();
    }
}

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
    /// `[limits]`: resources of each RUN step.
    pub limits: StepLimits,
    /// `[gc]`: background garbage collection of the cache.
    pub gc: GcConfig,
    /// `[history]`: how many finished builds `kilnctl history` keeps.
    pub history: HistoryConfig,
    /// `[tls]`: certificates of `tcp://` listeners (mutual TLS).
    pub tls: crate::TlsFiles,
    /// Where Prometheus metrics are served (`HOST:PORT`, plain HTTP,
    /// `/metrics`); empty: not served.
    pub metrics_addr: String,
    /// OTLP/HTTP base URL traces are exported to (`http://HOST:4318`);
    /// empty: none (OTEL_EXPORTER_OTLP_ENDPOINT wins).
    pub otlp_endpoint: String,
    /// Run (on a blocking thread) after every build: kilnd hands the
    /// allocator's free memory back to the system there.
    #[serde(skip)]
    pub after_build: Option<fn()>,
}

/// `[gc]`: when the cache is collected and by which policies.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    pub enabled: bool,
    /// How often an idle daemon applies the policies (they also run after
    /// each build).
    pub interval: String,
    /// Applied in order; none given: BuildKit's defaults.
    pub policy: Vec<GcPolicyConfig>,
}

/// `[limits]`: what one RUN step may use; a step that goes over fails
/// (memory: the kernel's OOM killer; pids: fork fails), the daemon and the
/// other steps go on.
impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            interval: "10m".into(),
            policy: Vec::new(),
        }
    }
}

/// One policy, with BuildKit's keys. Sizes are bytes (`10GB`, `512MB`) or a
/// percentage of the disk holding the state directory (`10%`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct GcPolicyConfig {
    pub all: bool,
    pub filters: Vec<String>,
    pub keep_duration: String,
    pub reserved_space: String,
    pub max_used_space: String,
    pub min_free_space: String,
    /// BuildKit's older name for maxUsedSpace.
    pub keep_bytes: String,
}

impl GcConfig {
    /// The policies to apply (the configured ones or the defaults), with
    /// sizes resolved against a disk of `disk` bytes.
    pub fn policies(&self, disk: u64) -> Result<Vec<crate::gc::Policy>, String> {
        let defaults;
        let list = if self.policy.is_empty() {
            defaults = default_policies();
            &defaults
        } else {
            &self.policy
        };
        let size = |what: &str, v: &str| -> Result<u64, String> {
            let v = v.trim();
            if v.is_empty() {
                return Ok(0);
            }
            if let Some(p) = v.strip_suffix('%') {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("gc policy {what} {v:?}: not a percentage"))?;
                return Ok((disk as f64 * p / 100.0) as u64);
            }
            parse_size(v).map_err(|e| format!("gc policy {what}: {e}"))
        };
        list.iter()
            .map(|p| {
                Ok(crate::gc::Policy {
                    all: p.all,
                    filters: crate::gc::Filters::parse(&p.filters).map_err(|e| e.to_string())?,
                    keep_duration: if p.keep_duration.is_empty() {
                        0
                    } else {
                        crate::gc::parse_duration(&p.keep_duration).map_err(|e| e.to_string())?
                    },
                    reserved: size("reservedSpace", &p.reserved_space)?,
                    max_used: size("maxUsedSpace", &p.max_used_space)?
                        .max(size("keepBytes", &p.keep_bytes)?),
                    min_free: size("minFreeSpace", &p.min_free_space)?,
                })
            })
            .collect()
    }
}

/// BuildKit's default policies, in its order: local sources and cache
/// mounts unused for two days go first, then anything unused for 60 days,
/// then whatever keeps the cache within its share of the disk.
fn default_policies() -> Vec<GcPolicyConfig> {
    let p = |all: bool, filters: &[&str], keep: &str, reserved: &str, max: &str, free: &str| {
        GcPolicyConfig {
            all,
            filters: filters.iter().map(|s| s.to_string()).collect(),
            keep_duration: keep.into(),
            reserved_space: reserved.into(),
            max_used_space: max.into(),
            min_free_space: free.into(),
            keep_bytes: String::new(),
        }
    };
    vec![
        p(false, &["type==source.local"], "48h", "", "512MB", ""),
        p(false, &["type==exec.cachemount"], "48h", "", "512MB", ""),
        p(false, &[], "1440h", "10%", "60%", ""),
        p(false, &[], "", "10%", "60%", "20%"),
        p(true, &[], "", "10%", "60%", "20%"),
    ]
}

/// `[history]`: finished builds are kept (with their logs, each at most
/// 4 MiB) while they are among the newest `max_entries` and younger than
/// `max_age` (BuildKit's defaults: 50 builds, 48 hours).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    pub max_entries: usize,
    /// A duration (`48h`, `7d`); empty or `0` keeps them whatever their age.
    pub max_age: String,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_entries: 50,
            max_age: "48h".into(),
        }
    }
}

impl HistoryConfig {
    /// Checked when the config is loaded; an unparsable age keeps all.
    pub fn limits(&self) -> kiln_cache::HistoryLimits {
        kiln_cache::HistoryLimits {
            max_entries: self.max_entries,
            max_age: if self.max_age.trim().is_empty() {
                0
            } else {
                crate::gc::parse_duration(&self.max_age).unwrap_or(0)
            },
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.max_age.trim().is_empty() {
            crate::gc::parse_duration(&self.max_age)
                .map_err(|e| format!("history.max_age: {e}"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StepLimits {
    /// Memory, as bytes or with a unit: "512m", "4g". Empty: unlimited.
    pub memory: String,
    /// Processes and threads; 0 means unlimited.
    pub pids: u64,
    /// CPU time in cores ("1.5"); 0 means unlimited.
    pub cpus: f64,
}

/// A step may not fork-bomb the host: this machine class has 32768 pids.
pub const DEFAULT_STEP_PIDS: u64 = 4096;

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            memory: String::new(),
            pids: DEFAULT_STEP_PIDS,
            cpus: 0.0,
        }
    }
}

/// Parses "1073741824", "512k", "512m", "4g" (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?} (use bytes or 512m, 4g)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("invalid size {s:?}: must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

impl StepLimits {
    pub fn to_limits(&self) -> Result<kiln_executor::Limits, String> {
        if !(self.cpus.is_finite() && self.cpus >= 0.0) {
            return Err(format!("limits.cpus {}: must be 0 or more", self.cpus));
        }
        Ok(kiln_executor::Limits {
            memory_bytes: if self.memory.trim().is_empty() {
                None
            } else {
                Some(parse_size(&self.memory).map_err(|e| format!("limits.memory: {e}"))?)
            },
            pids: (self.pids > 0).then_some(self.pids),
            cpus: (self.cpus > 0.0).then_some(self.cpus),
        })
    }
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
            limits: StepLimits::default(),
            gc: GcConfig::default(),
            history: HistoryConfig::default(),
            tls: Default::default(),
            metrics_addr: String::new(),
            otlp_endpoint: String::new(),
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
        std::fs::write(&d, "[limits]\nmemory = \"512m\"\ncpus = 1.5\n").unwrap();
        let l = Config::load(&d).unwrap().limits.to_limits().unwrap();
        assert_eq!(l.memory_bytes, Some(512 << 20));
        assert_eq!(l.pids, Some(DEFAULT_STEP_PIDS));
        assert_eq!(l.cpus, Some(1.5));
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
        std::fs::write(
            &d,
            "[gc]\ninterval = \"1m\"\n[[gc.policy]]\nfilters = [\"type==source.local\"]\nkeepDuration = \"48h\"\n[[gc.policy]]\nmaxUsedSpace = \"50%\"\nreservedSpace = \"1GB\"\nall = true\n",
        )
        .unwrap();
        let p = Config::load(&d).unwrap().gc.policies(10 << 30).unwrap();
        assert_eq!(p[0].keep_duration, 48 * 3600);
        assert_eq!(
            (p[1].max_used, p[1].reserved, p[1].all),
            (5 << 30, 1 << 30, true)
        );
        assert_eq!(GcConfig::default().policies(100 << 30).unwrap().len(), 5);
        std::fs::write(&d, "[[gc.policy]]\nkeepStorage = \"1GB\"\n").unwrap();
        assert!(
            Config::load(&d)
                .unwrap_err()
                .to_string()
                .contains("keepStorage")
        );
        std::fs::write(&d, "rot = 1\n").unwrap();
        let e = Config::load(&d).unwrap_err().to_string();
        assert!(e.contains("rot"), "{e}");
        // The farm's kilnd.toml (deploy/kubernetes/kilnd.yaml) is one kilnd reads.
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/kilnd.yaml"),
        )
        .unwrap();
        let toml: String = yaml
            .lines()
            .skip_while(|l| !l.contains("kilnd.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        std::fs::write(&d, &toml).unwrap();
        let farm = Config::load(&d).unwrap();
        assert!(farm.addr.iter().any(|a| a.starts_with("tcp://")));
        assert!(farm.tls.cert.is_some() && farm.tls.key.is_some() && farm.tls.ca.is_some());
        assert_eq!(farm.gc.policies(20 << 30).unwrap().len(), 2);
        std::fs::remove_file(&d).unwrap();
    }
}

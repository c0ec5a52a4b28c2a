//! Registry credentials from the user's docker config (`$DOCKER_CONFIG` or
//! `~/.docker/config.json`): `auths` entries and credential helpers. They
//! are read on the client, per host, only when the daemon asks.

use std::path::PathBuf;

use base64::Engine as _;

fn config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Keys a host may be stored under (Docker Hub has its historical URL).
fn candidates(host: &str) -> Vec<String> {
    let mut v = vec![
        host.to_string(),
        format!("https://{host}"),
        format!("http://{host}"),
        format!("https://{host}/v1/"),
        format!("https://{host}/v2/"),
    ];
    if host == "docker.io" || host == "index.docker.io" || host == "registry-1.docker.io" {
        v.push("https://index.docker.io/v1/".into());
    }
    v
}

/// Whether there is no docker config to read credentials from.
pub fn no_credentials() -> bool {
    config_path().is_none_or(|p| !p.exists())
}

/// `(username, secret)` for `host`, or None when the config has nothing.
pub fn docker_credentials(host: &str) -> Result<Option<(String, String)>, String> {
    match config_path() {
        Some(path) => credentials_from(&path, host),
        None => Ok(None),
    }
}

/// The same, from a given config.json.
pub fn credentials_from(
    path: &std::path::Path,
    host: &str,
) -> Result<Option<(String, String)>, String> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let cfg: serde_json::Value =
        serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))?;
    let keys = candidates(host);
    let helper = keys
        .iter()
        .find_map(|k| cfg["credHelpers"][k].as_str())
        .or_else(|| cfg["credsStore"].as_str())
        .map(str::to_string);
    for k in &keys {
        let entry = &cfg["auths"][k];
        if let Some(auth) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth)
                .map_err(|e| format!("{}: auth for {k}: {e}", path.display()))?;
            let text = String::from_utf8_lossy(&raw).to_string();
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| format!("{}: auth for {k} is not user:password", path.display()))?;
            return Ok(Some((u.to_string(), p.to_string())));
        }
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Ok(Some((u.to_string(), p.to_string())));
        }
    }
    if let Some(h) = helper {
        return from_helper(&h, host);
    }
    Ok(None)
}

fn from_helper(helper: &str, host: &str) -> Result<Option<(String, String)>, String> {
    use std::io::Write;
    let bin = format!("docker-credential-{helper}");
    let mut child = std::process::Command::new(&bin)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(host.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if !out.status.success() {
        // Helpers exit non-zero for "no credentials for this server".
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{bin}: {e}"))?;
    match (v["Username"].as_str(), v["Secret"].as_str()) {
        (Some(u), Some(s)) => Ok(Some((u.to_string(), s.to_string()))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auths() {
        let d = tempfile_dir();
        let cfg = d.join("config.json");
        std::fs::write(
            &cfg,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0"}}}"#,
        )
        .unwrap();
        assert_eq!(
            credentials_from(&cfg, "127.0.0.1:5000").unwrap(),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(credentials_from(&cfg, "example.com").unwrap(), None);
        assert_eq!(
            credentials_from(&d.join("missing.json"), "x").unwrap(),
            None
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-auth-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

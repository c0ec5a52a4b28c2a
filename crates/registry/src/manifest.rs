//! Manifest GETs and the token handshake with a size bound. oci-client
//! reads a manifest's body, and a token service's answer, whole: a registry
//! that answers `FROM` or `--cache-from` with gigabytes would have kilnd
//! hold them all. Ours are streamed and cut ([`MAX_MANIFEST`]), manifests
//! verified against their digest; oci-client is handed the token for the
//! uploads it still makes.

use futures::StreamExt;
use kiln_digest::Digest;
use oci_client::{Reference, RegistryOperation};

use crate::{Credentials, RegistryClient, RegistryError, cause, err};

/// The largest manifest or index read (real ones are kilobytes; BuildKit
/// caps them at 4 MiB too).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// The largest token service answer read (a token is a few kilobytes).
const MAX_TOKEN_ANSWER: u64 = 256 << 10;

/// The realm and service of a `WWW-Authenticate: Bearer ...` challenge.
fn bearer_challenge(header: &str) -> Option<(String, Option<String>)> {
    let rest = header.trim_start();
    let (scheme, params) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let (mut realm, mut service) = (None, None);
    // key="value" pairs separated by commas; values may hold commas.
    let mut s = params.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        match key.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_string()),
            "service" => service = Some(value.to_string()),
            _ => {}
        }
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some((realm?, service))
}

impl RegistryClient {
    /// A reqwest client with the same TLS settings as `client_for`, one per
    /// registry host, kept (with its connections) across requests.
    fn http_client(&self, r: &Reference) -> Result<reqwest::Client, RegistryError> {
        let host = r.resolve_registry().to_string();
        if let Some(c) = self.pool.http.get(&host) {
            return Ok(c);
        }
        let c = self.new_http_client(r)?;
        self.pool.http.insert(host, c.clone());
        Ok(c)
    }

    fn new_http_client(&self, r: &Reference) -> Result<reqwest::Client, RegistryError> {
        let cfg = self
            .config
            .hosts
            .get(r.resolve_registry())
            .cloned()
            .unwrap_or_default();
        let mut b = reqwest::Client::builder().danger_accept_invalid_certs(cfg.insecure);
        for pem in &cfg.ca_pem {
            let cert = reqwest::Certificate::from_pem(pem).map_err(|e| err(r, cause(&e)))?;
            b = b.add_root_certificate(cert);
        }
        b.build().map_err(|e| err(r, cause(&e)))
    }

    /// The bearer token for `op` on `r`'s repository (None when the
    /// registry needs none), reused for [`crate::pool::TOKEN_TTL`]: without
    /// it every request would first ask `/v2/` how to authenticate.
    pub(crate) async fn token(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        op: RegistryOperation,
        force_http: bool,
    ) -> Result<Option<String>, RegistryError> {
        let key = self.token_key(r, creds, op);
        let token = match self.pool.tokens.get(&key) {
            Some((token, at)) if at.elapsed() < crate::pool::TOKEN_TTL => token,
            _ => {
                let token = self.negotiate(client, r, creds, op, force_http).await?;
                self.pool
                    .tokens
                    .insert(key, (token.clone(), std::time::Instant::now()));
                token
            }
        };
        // oci-client's uploads use the same token: handed over, it never
        // asks for one itself (its own ask reads the answer unbounded).
        if let Some(t) = &token {
            let _ = client
                .auth(r, &oci_client::secrets::RegistryAuth::Bearer(t.clone()), op)
                .await;
        }
        Ok(token)
    }

    /// The token handshake of the distribution spec: `/v2/` says how to
    /// authenticate; a Bearer challenge names the token service, asked with
    /// the credentials for this repository and operation. Every answer is
    /// read with a bound, so a hostile registry or token service cannot make
    /// kilnd hold more. None: the registry wants no token (open, or HTTP
    /// Basic, which oci-client is then told about).
    async fn negotiate(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        op: RegistryOperation,
        force_http: bool,
    ) -> Result<Option<String>, RegistryError> {
        let http = self.http_client(r)?;
        let base = self.repository_url(r, force_http);
        let v2 = format!("{}/", &base[..base.len() - r.repository().len() - 1]);
        let res = http.get(&v2).send().await.map_err(|e| err(r, cause(&e)))?;
        let challenge = res
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        drop(res);
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        let Some((realm, service)) = bearer_challenge(&challenge) else {
            // HTTP Basic: oci-client learns the credentials (its check of
            // `/v2/` reads no body).
            client
                .auth(r, &Self::auth(creds), op)
                .await
                .map_err(|e| err(r, cause(&e)))?;
            return Ok(None);
        };
        let scope = match op {
            RegistryOperation::Pull => format!("repository:{}:pull", r.repository()),
            RegistryOperation::Push => format!("repository:{}:pull,push", r.repository()),
        };
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = http.get(&realm).query(&query);
        if let Some(c) = creds.filter(|c| !c.username.is_empty()) {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let res = req.send().await.map_err(|e| err(r, cause(&e)))?;
        let status = res.status();
        let body = Self::read_capped(res, r, MAX_TOKEN_ANSWER, "token service answer").await?;
        if !status.is_success() {
            // Cut as the manifest PUT's refusal is.
            let text: String = String::from_utf8_lossy(&body).chars().take(512).collect();
            return Err(err(r, format!("token service: HTTP {status}: {text}")));
        }
        let a: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| err(r, format!("token service answer: {e}")))?;
        match a["token"].as_str().or(a["access_token"].as_str()) {
            Some(t) if !t.is_empty() => Ok(Some(t.to_string())),
            _ => Err(err(r, "token service answer holds no token")),
        }
    }

    fn token_key(
        &self,
        r: &Reference,
        creds: Option<&Credentials>,
        op: RegistryOperation,
    ) -> crate::pool::TokenKey {
        (
            r.resolve_registry().to_string(),
            format!("{}#{op:?}", r.repository()),
            crate::pool::creds_key(creds),
        )
    }

    /// `http(s)://host/v2/<repository>/` for `r`.
    fn repository_url(&self, r: &Reference, force_http: bool) -> String {
        let scheme = if self.uses_http(r, force_http) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}", r.resolve_registry(), r.repository())
    }

    /// `.../manifests/<tag or digest>` of `r`.
    fn manifest_url(&self, r: &Reference, force_http: bool) -> String {
        let reference = r
            .digest()
            .map(str::to_string)
            .unwrap_or_else(|| r.tag().unwrap_or("latest").to_string());
        format!(
            "{}/manifests/{reference}",
            self.repository_url(r, force_http)
        )
    }

    /// A response body held in memory, refused past `limit` bytes (said or
    /// sent): a registry cannot make kilnd hold more.
    pub(crate) async fn read_capped(
        res: reqwest::Response,
        r: &Reference,
        limit: u64,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let too_big = || {
            err(
                r,
                format!("{what}: more than {limit} bytes (the most kiln reads)"),
            )
        };
        if res.content_length().is_some_and(|n| n > limit) {
            return Err(too_big());
        }
        let mut body = Vec::new();
        let mut stream = res.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| err(r, cause(&e)))?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Sends the request `make` builds with the token for `op`; a refusal
    /// with a reused token gets one retry with a fresh one.
    async fn send_authorized(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        op: RegistryOperation,
        force_http: bool,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut refused = false;
        let mut broken = false;
        loop {
            let token = self.token(client, r, creds, op, force_http).await?;
            let mut req = make(&self.http_client(r)?);
            req = match (token, creds) {
                (Some(t), _) => req.bearer_auth(t),
                (None, Some(c)) if !c.username.is_empty() => {
                    req.basic_auth(&c.username, Some(&c.password))
                }
                _ => req,
            };
            let res = match req.send().await {
                Ok(res) => res,
                // A kept connection the registry closed (or left unusable)
                // fails the request before anything was answered: once more,
                // on a new connection.
                Err(e) if !broken && !e.is_timeout() => {
                    broken = true;
                    tracing::debug!(registry = %r.resolve_registry(), "retrying on a new connection: {e}");
                    continue;
                }
                Err(e) => return Err(err(r, cause(&e))),
            };
            if res.status() == http::StatusCode::UNAUTHORIZED && !refused {
                refused = true;
                self.pool.tokens.remove(&self.token_key(r, creds, op));
                continue;
            }
            return Ok(res);
        }
    }

    /// A manifest request (GET or HEAD) for `r`'s tag or digest.
    async fn manifest_request(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        accepted: &[&str],
        method: http::Method,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = self.manifest_url(r, false);
        let accept = accepted.join(", ");
        self.send_authorized(client, r, creds, RegistryOperation::Pull, false, |c| {
            c.request(method.clone(), &url)
                .header(http::header::ACCEPT, accept.clone())
        })
        .await
    }

    /// Whether the registry has blob `d` in `r`'s repository (HEAD, with
    /// the push token a push already holds).
    pub(crate) async fn blob_exists(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        force_http: bool,
        d: &Digest,
    ) -> Result<bool, RegistryError> {
        let url = format!("{}/blobs/{d}", self.repository_url(r, force_http));
        let res = self
            .send_authorized(client, r, creds, RegistryOperation::Push, force_http, |c| {
                c.head(&url)
            })
            .await?;
        match res.status() {
            s if s.is_success() => Ok(true),
            http::StatusCode::NOT_FOUND => Ok(false),
            s => Err(err(r, format!("checking blob {d}: HTTP {s}"))),
        }
    }

    /// GET of blob `d` of `r`'s repository (redirects to storage are
    /// followed; the token is not sent to another host).
    pub(crate) async fn get_blob(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        d: &Digest,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/blobs/{d}", self.repository_url(r, false));
        let res = self
            .send_authorized(client, r, creds, RegistryOperation::Pull, false, |c| {
                c.get(&url)
            })
            .await?;
        match res.status() {
            s if s.is_success() => Ok(res),
            http::StatusCode::NOT_FOUND => Err(err(r, format!("blob {d}: not found"))),
            s => Err(err(r, format!("blob {d}: HTTP {s}"))),
        }
    }

    /// PUTs a manifest (or index) under `r`'s tag or digest; returns the
    /// URL the registry gives it.
    pub(crate) async fn put_manifest(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        force_http: bool,
        (manifest, media_type): (&[u8], &str),
    ) -> Result<String, RegistryError> {
        let url = self.manifest_url(r, force_http);
        let body = manifest.to_vec();
        let res = self
            .send_authorized(client, r, creds, RegistryOperation::Push, force_http, |c| {
                c.put(&url)
                    .header(http::header::CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            let text: String = text.chars().take(512).collect();
            return Err(err(
                r,
                format!("pushing the manifest: HTTP {status}: {text}"),
            ));
        }
        Ok(res
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&url)
            .to_string())
    }

    /// The digest of the document a tag names, from a HEAD request's
    /// `Docker-Content-Digest` (None when the registry does not say).
    pub(crate) async fn head_manifest(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        accepted: &[&str],
    ) -> Result<Option<String>, RegistryError> {
        let res = self
            .manifest_request(client, r, creds, accepted, http::Method::HEAD)
            .await?;
        let status = res.status();
        if status == http::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                reference: r.whole(),
            });
        }
        if !status.is_success() {
            return Ok(None);
        }
        Ok(res
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.parse::<Digest>().is_ok())
            .map(str::to_string))
    }

    /// The document `r` names, as stored: its bytes (at most
    /// [`MAX_MANIFEST`]) and digest.
    /// `client` is the oci-client that negotiates (and keeps) the auth.
    pub(crate) async fn get_manifest(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        accepted: &[&str],
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let res = self
            .manifest_request(client, r, creds, accepted, http::Method::GET)
            .await?;
        let status = res.status();
        if status == http::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound {
                reference: r.whole(),
            });
        }
        if !status.is_success() {
            return Err(err(r, format!("manifest: HTTP {status}")));
        }
        let header_digest = res
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Self::read_capped(res, r, MAX_MANIFEST, "the registry's manifest").await?;
        let digest = Digest::of(&body);
        // By digest: the bytes must be those. By tag: the registry's own
        // digest header, when it sends one, must agree.
        let expected = r.digest().map(str::to_string).or(header_digest);
        if let Some(e) = expected
            && e != digest.as_str()
        {
            return Err(err(
                r,
                format!("manifest does not match its digest {e} (content is {digest})"),
            ));
        }
        Ok((body, digest))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};

    use super::*;

    /// A registry that answers every manifest GET with `size` bytes, with
    /// or without saying so up front.
    fn hostile_registry(size: usize, say_length: bool) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                // Headers up to the blank line.
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut w = conn;
                if line.starts_with("GET /v2/ ") {
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
                    continue;
                }
                let head = if say_length {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {size}\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = w.write_all(head.as_bytes());
                let chunk = vec![b' '; 64 << 10];
                let mut sent = 0;
                while sent < size {
                    if w.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_huge_manifest_is_refused_not_held() {
        let client = RegistryClient::new(Default::default());
        for say_length in [true, false] {
            let addr = hostile_registry(64 << 20, say_length);
            let e = client
                .resolve(&format!("{addr}/x/y:big"), "linux", "amd64", "", None)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("more than 4194304 bytes"), "{say_length}: {e}");
            let e = client
                .fetch_manifest(&format!("{addr}/x/y:big"), None)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("more than 4194304 bytes"), "{say_length}: {e}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_longer_than_its_descriptor_is_cut_off() {
        let client = RegistryClient::new(Default::default());
        let store_dir = tempfile::tempdir().unwrap();
        let store = kiln_content::ContentStore::open(store_dir.path()).unwrap();
        let addr = hostile_registry(64 << 20, false);
        let layer = crate::LayerDesc {
            digest: Digest::of(b"0123456789"),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            size: 10,
        };
        let e = client
            .fetch_blob(&format!("{addr}/x/y:v1"), &layer, &store, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than the 10 bytes"), "{e}");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn bearer_challenges_are_read_as_registries_write_them() {
        assert_eq!(
            bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some((
                "https://auth.example/token".to_string(),
                Some("registry.example".to_string())
            ))
        );
        assert_eq!(
            bearer_challenge(r#"bearer service="s", realm="http://h/t""#),
            Some(("http://h/t".to_string(), Some("s".to_string())))
        );
        assert_eq!(bearer_challenge(r#"Basic realm="Registry Realm""#), None);
        assert_eq!(bearer_challenge(r#"Bearer service="s""#), None);
    }

    /// A registry whose token service gives `token_answer`; manifests are
    /// served only with `Authorization: Bearer good`.
    fn token_registry(token_answer: Vec<u8>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let realm = format!("http://{addr}/token");
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let mut authorized = false;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    authorized |= h.eq_ignore_ascii_case("authorization: bearer good\r\n");
                }
                let mut w = conn;
                let reply = if line.starts_with("GET /token") {
                    let mut head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        token_answer.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(&token_answer);
                    head
                } else if authorized {
                    let doc = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
                    let mut head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n\r\n",
                        doc.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(doc);
                    head
                } else {
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"test\"\r\nContent-Length: 0\r\n\r\n"
                    )
                    .into_bytes()
                };
                let _ = w.write_all(&reply);
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_are_asked_with_bounds() {
        let client = RegistryClient::new(Default::default());
        // A token service that answers properly: the manifest comes.
        let addr = token_registry(br#"{"token":"good"}"#.to_vec());
        let (doc, _) = client
            .fetch_manifest(&format!("{addr}/x/y:v1"), None)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&doc).contains("schemaVersion"));
        // One that answers with 64 MiB is refused, not held.
        let addr = token_registry(vec![b' '; 64 << 20]);
        let e = client
            .fetch_manifest(&format!("{addr}/x/y:v1"), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 262144 bytes"), "{e}");
    }
}

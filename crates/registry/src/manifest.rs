//! Manifest GETs with a size bound. oci-client reads a manifest's body
//! whole, so a registry that answers `FROM` or `--cache-from` with gigabytes
//! would have kilnd hold them all. The auth handshake stays oci-client's
//! (`Client::auth` gives the bearer token it negotiated); the GET is ours,
//! streamed and cut at [`MAX_MANIFEST`], and verified against its digest.

use futures::StreamExt;
use kiln_digest::Digest;
use oci_client::{Reference, RegistryOperation};

use crate::{Credentials, RegistryClient, RegistryError, cause, err};

/// The largest manifest or index read (real ones are kilobytes; BuildKit
/// caps them at 4 MiB too).
pub const MAX_MANIFEST: u64 = 4 << 20;

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
    async fn token(
        &self,
        client: &oci_client::Client,
        r: &Reference,
        creds: Option<&Credentials>,
        op: RegistryOperation,
    ) -> Result<Option<String>, RegistryError> {
        let key = self.token_key(r, creds, op);
        if let Some((token, at)) = self.pool.tokens.get(&key)
            && at.elapsed() < crate::pool::TOKEN_TTL
        {
            return Ok(token);
        }
        let token = client
            .auth(r, &Self::auth(creds), op)
            .await
            .map_err(|e| err(r, cause(&e)))?;
        self.pool
            .tokens
            .insert(key, (token.clone(), std::time::Instant::now()));
        Ok(token)
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
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut refused = false;
        let mut broken = false;
        loop {
            let token = self.token(client, r, creds, op).await?;
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
        self.send_authorized(client, r, creds, RegistryOperation::Pull, |c| {
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
            .send_authorized(client, r, creds, RegistryOperation::Push, |c| c.head(&url))
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
            .send_authorized(client, r, creds, RegistryOperation::Pull, |c| c.get(&url))
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
            .send_authorized(client, r, creds, RegistryOperation::Push, |c| {
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
}

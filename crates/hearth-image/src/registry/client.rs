//! One registry repository's client: resolves manifests and streams blobs into the store, handling
//! auth challenges, retries, resumption (`Range`) after a dropped connection, and stalls.
//! Network only; blob bytes go to a `BlobWriter`.

use std::sync::Mutex;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use super::auth::{Challenge, Credentials};
use super::body::{read_capped, sanitize, MAX_SMALL_BODY};
use super::creds::HostCredentials;
use super::policy::{TargetPolicy, REFUSAL_MARK};
use super::retry::RetryPolicy;
use super::RegistryError;
use crate::digest::Digest;
use crate::oci::MANIFEST_ACCEPT;
use crate::reference::RegistryRef;

/// Manifests and configs: OCI's documented manifest limit (error and token bodies get 64 KiB).
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How to reach registries: which speak plain HTTP, whose credentials, retries, and whether
/// redirect and token-realm targets may be private addresses.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub insecure: Vec<String>,
    pub credentials: HostCredentials,
    pub retry: RetryPolicy,
    /// Let redirects and Bearer realms point at loopback, link-local, private or metadata
    /// addresses (the registry the pull names is always allowed).
    pub allow_private: bool,
}

/// A manifest or index as the registry sent it.
pub struct FetchedManifest {
    pub body: Vec<u8>,
    pub media_type: Option<String>,
    pub digest: Digest,
}

pub struct RegistryClient {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) registry: String,
    pub(super) repository: String,
    /// Every host's credentials: this registry's own, and a token realm's on another host that
    /// has its own entry. Looked up only when a challenge asks for them.
    pub(super) credentials: HostCredentials,
    pub(super) targets: TargetPolicy,
    pub(super) policy: RetryPolicy,
    /// The `Authorization` value that last worked (a bearer token or basic credentials).
    pub(super) authorization: Mutex<Option<String>>,
}

impl RegistryClient {
    pub fn new(
        reference: &RegistryRef,
        options: &ClientOptions,
    ) -> Result<RegistryClient, RegistryError> {
        let host = reference.api_host();
        let policy = options.retry;
        let is_insecure = options.insecure.iter().any(|i| {
            let i = i.trim().trim_start_matches("http://").trim_end_matches('/');
            i == reference.registry || i == host || reference.registry.split(':').next() == Some(i)
        });
        let scheme = if is_insecure { "http" } else { "https" };
        let targets = TargetPolicy {
            registry_authority: host.to_ascii_lowercase(),
            insecure: options.insecure.clone(),
            allow_private: options.allow_private,
        };
        let redirect_targets = targets.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            let from_https = attempt
                .previous()
                .last()
                .is_some_and(|u| u.scheme() == "https");
            match redirect_targets.check("redirect to", attempt.url(), from_https) {
                Ok(()) => attempt.follow(),
                Err(refusal) => attempt.error(refusal),
            }
        });
        let mut builder = reqwest::Client::builder()
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.stall_timeout)
            .redirect(redirects)
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")));
        if !options.allow_private {
            builder = builder.dns_resolver(targets.resolver());
        }
        let http = builder
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        Ok(RegistryClient {
            http,
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            credentials: options.credentials.clone(),
            targets,
            policy,
            authorization: Mutex::new(None),
        })
    }

    /// GET (or HEAD, when `head`) a manifest by tag or digest.
    pub async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self
            .send(Method::GET, &url, Some(MANIFEST_ACCEPT), None, "manifest")
            .await?;
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(|s| sanitize(s.as_bytes()));
        let body = self.read_small(resp, &url, "manifest").await?;
        let digest = Digest::of(&body);
        let expected = reference
            .parse::<Digest>()
            .ok()
            .map(|d| d.to_string())
            .or(header_digest);
        if let Some(expected) = expected {
            if expected != digest.to_string() {
                return Err(RegistryError::ManifestDigest {
                    url,
                    expected,
                    actual: digest.to_string(),
                });
            }
        }
        Ok(FetchedManifest {
            body,
            media_type,
            digest,
        })
    }

    /// Resolves a tag to its manifest digest with a HEAD request (cheap "is my copy current?").
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<Digest>, RegistryError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self
            .send(Method::HEAD, &url, Some(MANIFEST_ACCEPT), None, "manifest")
            .await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok()))
    }

    /// Fetches a small blob (an image config) into memory, checking its digest.
    pub async fn small_blob(&self, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.send(Method::GET, &url, None, None, "blob").await?;
        let body = self.read_small(resp, &url, "config blob").await?;
        let actual = Digest::of(&body);
        if &actual != digest {
            return Err(crate::store::StoreError::DigestMismatch {
                digest: digest.clone(),
                expected_size: body.len() as u64,
                actual_size: body.len() as u64,
                actual,
            }
            .into());
        }
        Ok(body)
    }

    async fn read_small(
        &self,
        resp: Response,
        url: &str,
        what: &'static str,
    ) -> Result<Vec<u8>, RegistryError> {
        let (body, longer) =
            read_capped(resp, url, MAX_MANIFEST_BYTES, self.policy.stall_timeout).await?;
        if longer {
            return Err(RegistryError::TooLarge {
                url: url.into(),
                what,
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        Ok(body)
    }

    /// Sends a request with auth and retries; returns a successful response.
    async fn send(
        &self,
        method: Method,
        url: &str,
        accept: Option<&str>,
        range: Option<&str>,
        what: &str,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self
                .send_once_authed(method.clone(), url, accept, range)
                .await
            {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => match self.status_error(resp, url, what, attempt).await {
                    Attempt::Fatal(e) => return Err(e),
                    Attempt::Retry(e) => e,
                },
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => e,
            };
            if attempt >= self.policy.attempts {
                return Err(with_attempts(err, attempt));
            }
            tracing::debug!(%url, attempt, error = %err, "registry request failed; retrying");
            tokio::time::sleep(self.policy.delay(attempt)).await;
        }
    }

    /// The credentials bound to this registry's host, if any.
    pub(super) async fn own_credentials(&self) -> Option<Credentials> {
        self.credentials.for_host(&self.registry).await
    }

    /// One request; answers a 401 challenge once (fetching a token or using basic credentials).
    pub(super) async fn send_once_authed(
        &self,
        method: Method,
        url: &str,
        accept: Option<&str>,
        range: Option<&str>,
    ) -> Result<Response, Attempt> {
        let resp = self.send_raw(method.clone(), url, accept, range).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse);
        let authorization = match challenge {
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => self.fetch_token(&realm, service, scope).await?,
            Some(Challenge::Basic) => match &self.own_credentials().await {
                Some(c) => c.basic_header(),
                None => {
                    return Err(Attempt::Fatal(
                        self.unauthorized("the registry wants a user name and password"),
                    ))
                }
            },
            None => {
                return Err(Attempt::Fatal(
                    self.unauthorized("401 without a usable WWW-Authenticate challenge"),
                ))
            }
        };
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(authorization);
        let resp = self.send_raw(method, url, accept, range).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(Attempt::Fatal(
                self.unauthorized("credentials were refused"),
            ));
        }
        Ok(resp)
    }

    async fn send_raw(
        &self,
        method: Method,
        url: &str,
        accept: Option<&str>,
        range: Option<&str>,
    ) -> Result<Response, Attempt> {
        let mut headers = HeaderMap::new();
        if let Some(a) = accept {
            headers.insert(
                ACCEPT,
                HeaderValue::from_str(a).expect("static accept header"),
            );
        }
        if let Some(r) = range {
            headers.insert(RANGE, HeaderValue::from_str(r).expect("ascii range"));
        }
        let auth = self
            .authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(auth) = auth {
            if let Ok(v) = HeaderValue::from_str(&auth) {
                headers.insert(AUTHORIZATION, v);
            }
        }
        self.http
            .request(method, url)
            .headers(headers)
            .send()
            .await
            .map_err(|e| transport_error(url, &e))
    }

    pub(super) async fn status_error(
        &self,
        resp: Response,
        url: &str,
        what: &str,
        attempts: u32,
    ) -> Attempt {
        let status = resp.status();
        // At most 64 KiB is read, and only a short printable reason is kept.
        let body = match read_capped(resp, url, MAX_SMALL_BODY, self.policy.stall_timeout).await {
            Ok((bytes, _)) => sanitize(&bytes),
            Err(_) => String::new(),
        };
        match status {
            StatusCode::NOT_FOUND => Attempt::Fatal(RegistryError::NotFound {
                what: what.into(),
                url: url.into(),
            }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Attempt::Fatal(self.unauthorized(&format!("{status}: {body}")))
            }
            s if RetryPolicy::is_retryable_status(s.as_u16()) => {
                Attempt::Retry(RegistryError::Status {
                    url: url.into(),
                    status: s.as_u16(),
                    attempts,
                    body,
                })
            }
            s => Attempt::Fatal(RegistryError::Status {
                url: url.into(),
                status: s.as_u16(),
                attempts,
                body,
            }),
        }
    }

    pub(super) fn unauthorized(&self, detail: &str) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            detail: detail.into(),
        }
    }
}

/// How one try ended: worth retrying or not.
pub(super) enum Attempt {
    Retry(RegistryError),
    Fatal(RegistryError),
}

impl From<Attempt> for RegistryError {
    fn from(a: Attempt) -> Self {
        match a {
            Attempt::Retry(e) | Attempt::Fatal(e) => e,
        }
    }
}

pub(super) fn transport_error(url: &str, e: &reqwest::Error) -> Attempt {
    let detail = error_chain(e);
    // A redirect or resolved address the target policy refused: never retried.
    if let Some(at) = detail.find(REFUSAL_MARK) {
        return Attempt::Fatal(RegistryError::Refused {
            url: url.into(),
            detail: sanitize(&detail.as_bytes()[at..]),
        });
    }
    let lower = detail.to_ascii_lowercase();
    // TLS failures do not heal by retrying; the usual cause is a plain-HTTP registry.
    if lower.contains("invalidcontenttype")
        || lower.contains("certificate")
        || lower.contains("tls")
    {
        return Attempt::Fatal(RegistryError::Unreachable {
            url: url.into(),
            attempts: 1,
            detail: format!("TLS failed ({detail}); if this registry speaks plain HTTP, pass --insecure-registry"),
        });
    }
    let err = RegistryError::Unreachable {
        url: url.into(),
        attempts: 1,
        detail,
    };
    if e.is_builder() || e.is_redirect() {
        Attempt::Fatal(err)
    } else {
        Attempt::Retry(err)
    }
}

pub(super) fn with_attempts(err: RegistryError, n: u32) -> RegistryError {
    match err {
        RegistryError::Unreachable { url, detail, .. } => RegistryError::Unreachable {
            url,
            attempts: n,
            detail,
        },
        RegistryError::Broken { url, detail, .. } => RegistryError::Broken {
            url,
            attempts: n,
            detail,
        },
        RegistryError::Status {
            url, status, body, ..
        } => RegistryError::Status {
            url,
            status,
            attempts: n,
            body,
        },
        RegistryError::Stalled { url, secs, .. } => RegistryError::Stalled {
            url,
            secs,
            attempts: n,
        },
        RegistryError::Truncated {
            url, got, expected, ..
        } => RegistryError::Truncated {
            url,
            got,
            expected,
            attempts: n,
        },
        other => other,
    }
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

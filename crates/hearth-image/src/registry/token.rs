//! The Bearer token flow: ask the realm from the `WWW-Authenticate` challenge for a pull token.
//! The realm must pass the target policy (https, not private in serve mode); Basic credentials go
//! with the request only when the realm is the registry's own host (or Docker Hub's known token
//! service), or when the realm host has credentials of its own. The answer is read up to 64 KiB.
//! Network only.

use reqwest::header::AUTHORIZATION;
use reqwest::Url;

use super::auth::{Credentials, TokenResponse};
use super::body::{read_capped, sanitize, MAX_SMALL_BODY};
use super::client::{transport_error, with_attempts, Attempt, RegistryClient};
use super::policy::authority;
use super::retry::RetryPolicy;
use super::RegistryError;
use crate::reference::DOCKER_HUB;

/// Docker Hub's token service, which serves the Hub's registry from another host.
const DOCKER_HUB_AUTH: &str = "auth.docker.io";

impl RegistryClient {
    pub(super) async fn fetch_token(
        &self,
        realm: &str,
        service: Option<String>,
        scope: Option<String>,
    ) -> Result<String, Attempt> {
        let shown = sanitize(realm.as_bytes());
        let url: Url = realm.parse().map_err(|_| {
            Attempt::Fatal(self.unauthorized(&format!("the token realm {shown:?} is not a URL")))
        })?;
        self.targets
            .check("the token realm", &url, false)
            .map_err(|refusal| {
                Attempt::Fatal(RegistryError::Refused {
                    url: self.base.clone(),
                    detail: refusal.to_string(),
                })
            })?;
        let credentials = self.realm_credentials(&url).await;
        let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.get(url.clone()).query(&query);
            if let Some(c) = &credentials {
                req = req.header(AUTHORIZATION, c.basic_header());
            }
            let err = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let (body, longer) =
                        read_capped(resp, realm, MAX_SMALL_BODY, self.policy.stall_timeout)
                            .await
                            .map_err(Attempt::Retry)?;
                    if longer {
                        return Err(Attempt::Fatal(self.unauthorized(&format!(
                            "token endpoint {shown} sent an answer larger than {MAX_SMALL_BODY} bytes"
                        ))));
                    }
                    let token: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
                        Attempt::Fatal(self.unauthorized(&format!(
                            "token endpoint {shown} sent an unreadable answer"
                        )))
                    })?;
                    return match token.token.or(token.access_token) {
                        Some(t) => Ok(format!("Bearer {t}")),
                        None => Err(Attempt::Fatal(
                            self.unauthorized(&format!("token endpoint {shown} sent no token")),
                        )),
                    };
                }
                Ok(resp) if RetryPolicy::is_retryable_status(resp.status().as_u16()) => {
                    RegistryError::Status {
                        url: shown.clone(),
                        status: resp.status().as_u16(),
                        attempts: attempt,
                        body: String::new(),
                    }
                }
                Ok(resp) => {
                    return Err(Attempt::Fatal(self.unauthorized(&format!(
                        "token endpoint {shown} answered {}",
                        resp.status()
                    ))))
                }
                Err(e) => match transport_error(&shown, &e) {
                    Attempt::Retry(e) => e,
                    fatal => return Err(fatal),
                },
            };
            if attempt >= self.policy.attempts {
                return Err(Attempt::Fatal(with_attempts(err, attempt)));
            }
            tokio::time::sleep(self.policy.delay(attempt)).await;
        }
    }

    /// The Basic credentials a token request to `realm` may carry: the registry's own when the
    /// realm is on the registry's host (or is Docker Hub's token service for Docker Hub), else only
    /// credentials bound to the realm's host.
    async fn realm_credentials(&self, realm: &Url) -> Option<Credentials> {
        let realm_host = authority(realm);
        let own = realm_host == self.targets.registry_authority
            || (self.registry == DOCKER_HUB
                && realm_host == DOCKER_HUB_AUTH
                && realm.scheme() == "https");
        if own {
            self.own_credentials().await
        } else {
            self.credentials.for_host(&realm_host).await
        }
    }
}

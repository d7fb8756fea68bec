//! The Bearer token flow: ask the realm from the `WWW-Authenticate` challenge for a pull token,
//! with Basic credentials when there are any. Network only.

use reqwest::header::AUTHORIZATION;

use super::auth::TokenResponse;
use super::client::{transport_error, with_attempts, Attempt, RegistryClient};
use super::retry::RetryPolicy;
use super::RegistryError;

impl RegistryClient {
    pub(super) async fn fetch_token(
        &self,
        realm: &str,
        service: Option<String>,
        scope: Option<String>,
    ) -> Result<String, Attempt> {
        let scope = scope.unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.get(realm).query(&query);
            if let Some(c) = &self.credentials {
                req = req.header(AUTHORIZATION, c.basic_header());
            }
            let err = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let token: TokenResponse = resp.json().await.map_err(|e| {
                        Attempt::Fatal(self.unauthorized(&format!(
                            "token endpoint {realm} sent an unreadable answer: {e}"
                        )))
                    })?;
                    return match token.token.or(token.access_token) {
                        Some(t) => Ok(format!("Bearer {t}")),
                        None => Err(Attempt::Fatal(
                            self.unauthorized(&format!("token endpoint {realm} sent no token")),
                        )),
                    };
                }
                Ok(resp) if RetryPolicy::is_retryable_status(resp.status().as_u16()) => {
                    RegistryError::Status {
                        url: realm.into(),
                        status: resp.status().as_u16(),
                        attempts: attempt,
                        body: String::new(),
                    }
                }
                Ok(resp) => {
                    return Err(Attempt::Fatal(self.unauthorized(&format!(
                        "token endpoint {realm} answered {}",
                        resp.status()
                    ))))
                }
                Err(e) => match transport_error(realm, &e) {
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
}

//! Registry authentication: `WWW-Authenticate` challenge parsing (Bearer token flow and Basic),
//! credentials and their lookup in `~/.docker/config.json` (exact host only; credential helpers
//! are not run). `creds` decides which host gets which credentials. Reads the Docker config file;
//! writes nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:***)", self.username)
    }
}

impl std::str::FromStr for Credentials {
    type Err = String;
    /// `USER:PASSWORD` (the password may contain ':').
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials {
                username: u.into(),
                password: p.into(),
            }),
            _ => Err("credentials must be USER:PASSWORD".into()),
        }
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// Looks up `registry` in the Docker client config (`$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`). Credential helpers are not run.
    pub fn from_docker_config(registry: &str) -> Option<Credentials> {
        let path = docker_config_path()?;
        let text = std::fs::read(&path).ok()?;
        Self::from_docker_config_json(&text, registry)
    }

    pub fn from_docker_config_json(json: &[u8], registry: &str) -> Option<Credentials> {
        let config: DockerConfig = serde_json::from_slice(json).ok()?;
        let keys: Vec<String> = if registry == crate::reference::DOCKER_HUB {
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "docker.io",
                "registry-1.docker.io",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        } else {
            vec![
                registry.to_string(),
                format!("https://{registry}"),
                format!("http://{registry}"),
            ]
        };
        let entry = config.auths.iter().find(|(k, _)| {
            let k = k.trim_end_matches('/');
            keys.iter().any(|want| {
                want.trim_end_matches('/') == k
                    || k.strip_suffix("/v1").or(k.strip_suffix("/v2")) == Some(want.as_str())
            })
        })?;
        let auth = entry.1;
        if let Some(encoded) = &auth.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()?;
            return String::from_utf8(decoded).ok()?.parse().ok();
        }
        Some(Credentials {
            username: auth.username.clone()?,
            password: auth.password.clone()?,
        })
    }
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    Some(
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".docker")
            .join("config.json"),
    )
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Challenge {
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// `k1="v1",k2=v2` with quoted values that may contain commas.
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

/// The token endpoint's answer (Docker uses `token`, OAuth2-style servers `access_token`).
#[derive(Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#;
        assert_eq!(
            Challenge::parse(h).unwrap(),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#).unwrap(),
            Challenge::Basic
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn reads_docker_config_auths() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        let hub = Credentials::from_docker_config_json(json, "docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        let local = Credentials::from_docker_config_json(json, "127.0.0.1:5000").unwrap();
        assert_eq!(local.username, "a");
        assert!(Credentials::from_docker_config_json(json, "quay.io").is_none());
    }

    #[test]
    fn credentials_parse_and_hide_the_password() {
        let c: Credentials = "u:p:q".parse().unwrap();
        assert_eq!(c.password, "p:q");
        assert!(!format!("{c:?}").contains("p:q"));
        assert!(":x".parse::<Credentials>().is_err());
    }
}

//! The Docker client config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`) as `docker`
//! reads it for one registry host: the host's credential helper (`credHelpers`), else the default
//! credential store (`credsStore`), else the inline `auths` entry. A helper is run the way `docker`
//! runs it (`docker-credential-NAME get`, the server URL on stdin, JSON on stdout), but bounded: a
//! name that could leave `PATH` is refused, it has [`HELPER_TIMEOUT`] to answer and
//! [`HELPER_OUTPUT_LIMIT`] bytes to answer in, and it is killed past either. A helper is asked only
//! for the host a request goes to, so what it returns goes nowhere else. Reads the config file
//! (at most [`CONFIG_LIMIT`] bytes); writes nothing.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Credentials;
use crate::reference::DOCKER_HUB;

/// How long a credential helper may take (`docker-credential-pass` may wait on gpg-agent).
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a helper may print (a real answer is a few hundred bytes).
pub const HELPER_OUTPUT_LIMIT: u64 = 64 << 10;
/// The largest config file read.
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// The key Docker Hub's credentials are stored under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// A credential helper's answer to `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Why a credential helper gave no credentials (logged; the pull goes on without them and a
/// registry that wants some answers 401, which names the ways to give them).
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("{0:?} is not a credential helper name (letters, digits, '.', '-' and '_')")]
    BadName(String),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not answer within {HELPER_TIMEOUT:?}; it was killed")]
    Timeout { program: String },
    #[error("{program} printed more than {HELPER_OUTPUT_LIMIT} bytes; it was killed")]
    TooLarge { program: String },
    #[error("{program} failed: {reason}")]
    Failed { program: String, reason: String },
    #[error("{program} answered with an identity token, which hearth does not support")]
    IdentityToken { program: String },
}

/// The credentials the Docker client config holds for exactly `host` (normalised `host[:port]`,
/// `docker.io` for Docker Hub), running its credential helper when it names one.
pub async fn lookup(host: &str) -> Option<Credentials> {
    let config = read_config()?;
    let server = server_url(host);
    let helper = config
        .cred_helpers
        .iter()
        .find(|(key, _)| key_matches(key, host))
        .map(|(_, helper)| helper)
        .or(config.creds_store.as_ref())
        .filter(|name| !name.is_empty());
    if let Some(helper) = helper {
        match run_helper(helper, &server).await {
            Ok(found) => return found,
            Err(e) => {
                tracing::warn!("docker credential helper for {host}: {e}");
                return None;
            }
        }
    }
    inline_auth(&config, host)
}

fn read_config() -> Option<DockerConfig> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".docker")
            .join("config.json"),
    };
    let mut text = Vec::new();
    std::fs::File::open(&path)
        .ok()?
        .take(CONFIG_LIMIT)
        .read_to_end(&mut text)
        .ok()?;
    match serde_json::from_slice(&text) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            None
        }
    }
}

/// What `docker` passes a helper for `host`: Docker Hub's legacy URL, else the host itself.
fn server_url(host: &str) -> String {
    match host {
        DOCKER_HUB => DOCKER_HUB_KEY.to_string(),
        other => other.to_string(),
    }
}

/// Whether a config key (`host`, `https://host`, `https://host/v1/`, Docker Hub's aliases)
/// names `host`.
fn key_matches(key: &str, host: &str) -> bool {
    let wanted: Vec<String> = if host == DOCKER_HUB {
        [
            DOCKER_HUB_KEY,
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    } else {
        vec![
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
        ]
    };
    let key = key.trim_end_matches('/');
    wanted.iter().any(|want| {
        want.trim_end_matches('/') == key
            || key.strip_suffix("/v1").or(key.strip_suffix("/v2")) == Some(want.as_str())
    })
}

fn inline_auth(config: &DockerConfig, host: &str) -> Option<Credentials> {
    let (_, auth) = config.auths.iter().find(|(k, _)| key_matches(k, host))?;
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

/// `docker-credential-NAME get` for `server`: `Ok(None)` when it has nothing for that server.
async fn run_helper(name: &str, server: &str) -> Result<Option<Credentials>, HelperError> {
    let valid = !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
    if !valid {
        return Err(HelperError::BadName(name.chars().take(64).collect()));
    }
    let program = format!("docker-credential-{name}");
    let io_error = |source| HelperError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(io_error)?;
    let (mut stdin, stdout) = (child.stdin.take(), child.stdout.take());
    let exchange = async {
        if let Some(stdin) = stdin.as_mut() {
            // A helper that exits without reading is judged by its exit status below.
            let _ = stdin.write_all(server.as_bytes()).await;
        }
        drop(stdin);
        let mut out = Vec::new();
        if let Some(stdout) = stdout {
            stdout
                .take(HELPER_OUTPUT_LIMIT + 1)
                .read_to_end(&mut out)
                .await
                .map_err(io_error)?;
        }
        if out.len() as u64 > HELPER_OUTPUT_LIMIT {
            return Err(HelperError::TooLarge {
                program: program.clone(),
            });
        }
        let status = child.wait().await.map_err(io_error)?;
        Ok((status, out))
    };
    let (status, out) = tokio::time::timeout(HELPER_TIMEOUT, exchange)
        .await
        .map_err(|_| HelperError::Timeout {
            program: program.clone(),
        })??;
    if !status.success() {
        // The helpers' protocol: "credentials not found in native keychain" on stdout.
        if String::from_utf8_lossy(&out).contains("credentials not found") {
            return Ok(None);
        }
        return Err(HelperError::Failed {
            program,
            reason: format!("{status}: {}", crate::untrusted::sanitize(out.trim_ascii())),
        });
    }
    let answer: HelperAnswer = serde_json::from_slice(&out).map_err(|e| HelperError::Failed {
        program: program.clone(),
        reason: format!("its answer is not the helpers' JSON: {e}"),
    })?;
    if answer.username == "<token>" {
        return Err(HelperError::IdentityToken { program });
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inline `auths` entry of a config for `host`.
    fn from_json(json: &[u8], host: &str) -> Option<Credentials> {
        inline_auth(&serde_json::from_slice(json).ok()?, host)
    }

    #[test]
    fn reads_inline_auths() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        let hub = from_json(json, "docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(from_json(json, "127.0.0.1:5000").unwrap().username, "a");
        assert!(from_json(json, "quay.io").is_none());
    }

    #[tokio::test]
    async fn helper_names_that_could_leave_path_are_refused() {
        for bad in ["../../bin/sh", "a/b", ".hidden", "x y"] {
            let err = run_helper(bad, "reg.example").await.unwrap_err();
            assert!(matches!(err, HelperError::BadName(_)), "{bad}: {err}");
        }
    }
}

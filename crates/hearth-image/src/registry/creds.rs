//! Credentials bound to registry hosts: `HOST=USER:PASS` entries (from `--creds` or a credentials
//! file that only its owner may read), looked up by the exact `host[:port]` a request goes to, with
//! the Docker client config (per host too, credential helpers included: `docker_config`) as the
//! fallback. Credentials are never offered to another host. Reads the credentials file; writes
//! nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::auth::Credentials;
use crate::reference::DOCKER_HUB;

/// Credentials per registry host (`host[:port]`, as in image references).
#[derive(Clone, Default, Debug)]
pub struct HostCredentials {
    by_host: BTreeMap<String, Credentials>,
    /// Also consult the Docker client config (`~/.docker/config.json`). On by default.
    skip_docker_config: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentials must be written HOST=USER:PASS (the registry they are for, then the user name and password){0}")]
    Format(String),
    #[error("cannot read the credentials file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the credentials file {path} is readable or writable by group or others (mode {mode:o}); run chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
    #[error("{path} line {line}: {source}")]
    Line {
        path: String,
        line: usize,
        source: Box<CredentialsError>,
    },
}

impl HostCredentials {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the credentials for `host`.
    pub fn with(mut self, host: &str, credentials: Credentials) -> Self {
        self.insert(host, credentials);
        self
    }

    pub fn insert(&mut self, host: &str, credentials: Credentials) {
        self.by_host.insert(normalize_host(host), credentials);
    }

    /// Never reads `~/.docker/config.json` (for tests and for daemons that must not use root's logins).
    pub fn without_docker_config(mut self) -> Self {
        self.skip_docker_config = true;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// Parses and adds one `HOST=USER:PASS` entry. A bare `USER:PASS` is refused: it would be sent
    /// to whatever registry a pull names.
    pub fn add_entry(&mut self, entry: &str) -> Result<(), CredentialsError> {
        let Some((host, userpass)) = entry.split_once('=') else {
            return Err(CredentialsError::Format(
                "; a bare USER:PASS would be offered to any registry".into(),
            ));
        };
        let host = host.trim();
        if !valid_host(host) {
            return Err(CredentialsError::Format(format!(
                "; {:?} is not a registry host[:port]",
                host.chars().take(64).collect::<String>()
            )));
        }
        let credentials: Credentials = userpass
            .parse()
            .map_err(|_| CredentialsError::Format(String::new()))?;
        self.insert(host, credentials);
        Ok(())
    }

    /// Reads `HOST=USER:PASS` lines (blank lines and `#` comments ignored) from `path`, which must
    /// not be readable or writable by group or others.
    pub fn add_file(&mut self, path: &Path) -> Result<(), CredentialsError> {
        let shown = path.display().to_string();
        let read_err = |source| CredentialsError::Read {
            path: shown.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Permissions { path: shown, mode });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.add_entry(line).map_err(|e| CredentialsError::Line {
                path: shown.clone(),
                line: n + 1,
                source: Box::new(e),
            })?;
        }
        Ok(())
    }

    /// The credentials for exactly `host` (`host[:port]`): an explicit entry, else what the Docker
    /// client config has for that host (its credential helper, its store, or an inline entry).
    /// Asked only when a registry challenges, so helpers run only for hosts that want credentials.
    pub async fn for_host(&self, host: &str) -> Option<Credentials> {
        if let Some(c) = self.explicit(host) {
            return Some(c);
        }
        if self.skip_docker_config {
            return None;
        }
        super::docker_config::lookup(&normalize_host(host)).await
    }

    /// The `--creds` / credentials-file entry for exactly `host`, without the Docker config.
    pub fn explicit(&self, host: &str) -> Option<Credentials> {
        self.by_host.get(&normalize_host(host)).cloned()
    }
}

/// `https://Host:443/` -> `host:443`; Docker Hub's aliases -> `docker.io`.
pub(crate) fn normalize_host(host: &str) -> String {
    let h = host.trim();
    let h = h
        .strip_prefix("https://")
        .or_else(|| h.strip_prefix("http://"))
        .unwrap_or(h);
    let h = h.split('/').next().unwrap_or(h).to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => h,
    }
}

fn valid_host(host: &str) -> bool {
    let host = normalize_host(host);
    let digits = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => {
                ip.parse::<std::net::Ipv6Addr>().is_ok()
                    && (tail.is_empty() || tail.strip_prefix(':').is_some_and(digits))
            }
            None => false,
        };
    }
    let (name, port) = match host.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host.as_str(), None),
    };
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
        && port.is_none_or(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_bound_to_hosts() {
        let mut c = HostCredentials::new().without_docker_config();
        c.add_entry("registry.example:5000=bob:p=w:x").unwrap();
        let got = c.explicit("registry.example:5000").unwrap();
        assert_eq!(
            (got.username.as_str(), got.password.as_str()),
            ("bob", "p=w:x")
        );
        assert!(c.explicit("registry.example").is_none());
        assert!(c.explicit("evil.example:5000").is_none());
        c.add_entry("https://index.docker.io/v1/=hub:pw").unwrap();
        assert_eq!(c.explicit("docker.io").unwrap().username, "hub");
    }

    #[test]
    fn bare_user_pass_is_refused() {
        let mut c = HostCredentials::new();
        for bad in ["bob:pw", "bob:a=b", "=bob:pw", "host=nocolon", "a b=u:p"] {
            let err = c.add_entry(bad).unwrap_err().to_string();
            assert!(err.contains("HOST=USER:PASS"), "{bad}: {err}");
        }
        assert!(c.is_empty());
    }

    #[test]
    fn files_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "# comment\n\nreg.example=u:p\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = HostCredentials::new().add_file(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = HostCredentials::new().without_docker_config();
        c.add_file(&path).unwrap();
        assert_eq!(c.explicit("reg.example").unwrap().username, "u");
        std::fs::write(&path, "u:p\n").unwrap();
        let err = HostCredentials::new().add_file(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}

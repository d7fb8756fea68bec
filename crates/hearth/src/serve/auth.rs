//! Tenancy: the tokens file (TOML, or JSON when the file ends in `.json`) maps bearer tokens to
//! tenants with quotas, and [`Authenticated`] is the extractor every `/v1` handler takes, so no
//! handler can forget to authenticate. Tokens are stored and compared as SHA-256 digests, in
//! constant time, against every tenant (no early exit that would time which one matched).
//! Reads only the tokens file, once at start-up, and refuses it (as ssh refuses a private key) when
//! group or others may access it, when two tenants share a token, or when a tenant takes a name
//! the daemon uses itself ([`RESERVED_TENANTS`]).
//!
//! ```toml
//! [[tenants]]
//! name = "alice"
//! token = "s3cret"                 # or token_sha256 = "<hex of sha256(token)>"
//! quota = { sandboxes = 10, cpus = 8, memory = "16g", disk = "100g" }   # each optional; default: unlimited
//! network = { mode = "allow", allow = ["*.pypi.org", "10.1.0.0/16"] }   # the egress ceiling; default: open
//! namespace = "team-alice"         # `hearth gateway` only: the tenant's Kubernetes namespace; default: the name
//! ```
//!
//! Over TLS with `--client-ca` (`super::tls`), a request on a connection whose client certificate
//! verified is the [`Tenants::client_certificate_tenant`] (the node agent's `kubernetes` tenant,
//! which `hearth gateway` acts as) whatever bearer token it carries.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use hearth_sandbox::node::{Quota, Tenant};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tenants: Vec<TenantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    token: Option<String>,
    token_sha256: Option<String>,
    #[serde(default)]
    quota: QuotaEntry,
    /// The widest egress policy this tenant's sandboxes may have (default: open, with the private
    /// ranges closed unless listed here).
    #[serde(default)]
    network: Option<hearth_sandbox::NetworkPolicy>,
    /// `hearth gateway`: the Kubernetes namespace of this tenant's Sandboxes (default: its name).
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    sandboxes: Option<u32>,
    cpus: Option<u32>,
    /// A size like `16g`.
    memory: Option<String>,
    /// A size like `100g`: writable disk over the tenant's sandboxes, at their full sizes.
    disk: Option<String>,
}

/// Tenant names the daemon uses internally: `kubernetes` is the tenant the Kubernetes node agent
/// creates its sandboxes under (`hearth_k8s::node::NodeAgentConfig::new`); a tokens-file tenant of
/// that name would see and delete them.
pub const RESERVED_TENANTS: &[&str] = &["kubernetes"];

/// The tenants a daemon serves.
pub struct Tenants {
    entries: Vec<(Tenant, [u8; 32])>,
    /// Tenant name -> its Kubernetes namespace (`hearth gateway`); absent when neither a
    /// `namespace` is given nor the name is a valid namespace.
    namespaces: std::collections::HashMap<String, String>,
    /// Who a verified client certificate authenticates as.
    certificate_tenant: Option<Tenant>,
}

/// Whether `name` is a valid Kubernetes namespace (a DNS-1123 label).
pub fn is_namespace_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Tenants {
    pub fn load(path: &Path) -> anyhow::Result<Tenants> {
        let text = read_private(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?;
        let json = path.extension().is_some_and(|e| e == "json");
        Tenants::parse(&text, json)
            .with_context(|| format!("in the tokens file {}", path.display()))
    }

    pub fn parse(text: &str, json: bool) -> anyhow::Result<Tenants> {
        let file: TokensFile = match json {
            true => serde_json::from_str(text)?,
            false => toml::from_str(text)?,
        };
        if file.tenants.is_empty() {
            bail!("no tenants: add a [[tenants]] entry with a name and a token");
        }
        let mut entries = Vec::new();
        let mut namespaces = std::collections::HashMap::new();
        for t in file.tenants {
            if t.name.is_empty()
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!(
                    "tenant name {:?} must be letters, digits, '-', '_' or '.'",
                    t.name
                );
            }
            let digest = match (t.token, t.token_sha256) {
                (Some(token), None) if token.len() >= 8 => Sha256::digest(token.as_bytes()).into(),
                (Some(_), None) => bail!("tenant {}: token shorter than 8 characters", t.name),
                (None, Some(hex_digest)) => {
                    let bytes = hex::decode(hex_digest.trim())
                        .ok()
                        .filter(|b| b.len() == 32);
                    let bytes = bytes.with_context(|| {
                        format!("tenant {}: token_sha256 is not 64 hex digits", t.name)
                    })?;
                    <[u8; 32]>::try_from(bytes.as_slice()).expect("32 bytes")
                }
                _ => bail!(
                    "tenant {}: give exactly one of token and token_sha256",
                    t.name
                ),
            };
            if RESERVED_TENANTS
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&t.name))
            {
                bail!(
                    "tenant name {:?} is reserved: the daemon's Kubernetes node agent uses it for \
                     its own sandboxes; pick another name",
                    t.name
                );
            }
            if entries.iter().any(|(e, _): &(Tenant, _)| e.name == t.name) {
                bail!("tenant {} is listed twice", t.name);
            }
            if let Some((other, _)) = entries.iter().find(|(_, d)| *d == digest) {
                bail!(
                    "tenants {} and {} have the same token; give each tenant its own",
                    other.name,
                    t.name
                );
            }
            let size = |field: &str, value: &Option<String>| match value {
                Some(size) => crate::units::bytes(size).with_context(|| {
                    format!(
                        "tenant {}: quota {field} {size:?} is not a size like 16g",
                        t.name
                    )
                }),
                None => Ok(u64::MAX),
            };
            let memory_bytes = size("memory", &t.quota.memory)?;
            let quota = Quota {
                max_sandboxes: t.quota.sandboxes.unwrap_or(u32::MAX),
                vcpus: t.quota.cpus.unwrap_or(u32::MAX),
                memory_mib: if memory_bytes == u64::MAX {
                    u64::MAX
                } else {
                    memory_bytes >> 20
                },
                disk_bytes: size("disk", &t.quota.disk)?,
            };
            match &t.namespace {
                Some(ns) if !is_namespace_name(ns) => bail!(
                    "tenant {}: namespace {ns:?} is not a Kubernetes namespace name (lower-case \
                     letters, digits and '-', at most 63)",
                    t.name
                ),
                Some(ns) => {
                    namespaces.insert(t.name.clone(), ns.clone());
                }
                None if is_namespace_name(&t.name) => {
                    namespaces.insert(t.name.clone(), t.name.clone());
                }
                None => {}
            }
            entries.push((
                Tenant {
                    name: t.name,
                    quota,
                    network_ceiling: t
                        .network
                        .unwrap_or_else(hearth_sandbox::node::default_network_ceiling),
                },
                digest,
            ));
        }
        Ok(Tenants {
            entries,
            namespaces,
            certificate_tenant: None,
        })
    }

    /// No bearer tokens at all (a node API reached only with client certificates).
    pub fn none() -> Tenants {
        Tenants {
            entries: Vec::new(),
            namespaces: Default::default(),
            certificate_tenant: None,
        }
    }

    /// These tenants, plus `tenant` for requests on connections with a verified client certificate.
    pub fn with_client_certificate_tenant(mut self, tenant: Tenant) -> Tenants {
        self.certificate_tenant = Some(tenant);
        self
    }

    pub fn client_certificate_tenant(&self) -> Option<&Tenant> {
        self.certificate_tenant.as_ref()
    }

    /// The names of the token tenants, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(t, _)| t.name.as_str())
    }

    /// The Kubernetes namespace of `tenant` (`hearth gateway`).
    pub fn namespace(&self, tenant: &str) -> Option<&str> {
        self.namespaces.get(tenant).map(String::as_str)
    }

    /// The tenant whose token this is. Every entry is compared, in constant time.
    pub fn authenticate(&self, token: &str) -> Option<&Tenant> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (tenant, digest) in &self.entries {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(tenant);
            }
        }
        found
    }
}

/// The file's text, refused when group or others have any access to it (symlinks followed: the
/// mode checked is that of the file read, taken from the open handle).
fn read_private(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::File::open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "permissions {mode:04o} are too open: the tokens must not be accessible by group or \
             others; run `chmod 600 {}`",
            path.display()
        );
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// The token of the request's `Authorization: Bearer` header; 401 when there is none.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return Err(ApiError::unauthorized(
            "missing Authorization header: send `Authorization: Bearer <token>`",
        ));
    };
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
        })?;
    Ok(token.trim())
}

/// The tenant behind the request: the client-certificate tenant on a TLS connection whose client
/// certificate verified, else the one of its `Authorization: Bearer` token; 401 otherwise.
pub struct Authenticated(pub Tenant);

impl FromRequestParts<Arc<AppState>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<super::tls::Peer>>();
        if let Some(peer) = peer.filter(|p| p.0.client_certificate) {
            if let Some(tenant) = state.tenants.client_certificate_tenant() {
                tracing::trace!(peer = %peer.0.addr, tenant = %tenant.name, "client certificate");
                return Ok(Authenticated(tenant.clone()));
            }
        }
        let token = bearer_token(&parts.headers)?;
        match state.tenants.authenticate(token) {
            Some(tenant) => Ok(Authenticated(tenant.clone())),
            None => Err(ApiError::unauthorized("unknown token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token"
quota = { sandboxes = 2, cpus = 4, memory = "2g", disk = "10g" }

[[tenants]]
name = "bob"
network = { mode = "allow", allow = ["*.pypi.org"] }
token_sha256 = "da35348540eea93333fbee67961c2b02777aff29018cbbd343e7b9ac2e259122"
"#;

    #[test]
    fn tokens_map_to_tenants_with_quotas() {
        let tenants = Tenants::parse(FILE, false).unwrap();
        let alice = tenants.authenticate("alice-token").unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(
            alice.quota,
            Quota {
                max_sandboxes: 2,
                vcpus: 4,
                memory_mib: 2048,
                disk_bytes: 10 << 30,
            }
        );
        // sha256("bob-token-1")
        let bob = tenants.authenticate("bob-token-1").unwrap();
        assert_eq!(
            (bob.name.as_str(), bob.quota.max_sandboxes),
            ("bob", u32::MAX)
        );
        assert_eq!(bob.network_ceiling.mode, hearth_sandbox::NetworkMode::Allow);
        assert_eq!(bob.network_ceiling.allow[0].to_string(), "*.pypi.org");
        assert_eq!(
            alice.network_ceiling,
            hearth_sandbox::node::default_network_ceiling()
        );
        assert!(tenants.authenticate("alice-token ").is_none());
        assert!(tenants.authenticate("").is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, want) in [
            ("tenants = []", "no tenants"),
            (
                "[[tenants]]\nname = \"a\"\ntoken = \"short\"",
                "shorter than 8",
            ),
            ("[[tenants]]\nname = \"a\"", "exactly one of"),
            (
                "[[tenants]]\nname = \"a b\"\ntoken = \"12345678\"",
                "letters",
            ),
            (
                "[[tenants]]\nname = \"a\"\ntoken = \"12345678\"\nquota = { memory = \"lots\" }",
                "not a size",
            ),
            (
                "[[tenants]]\nname = \"a\"\ntoken = \"12345678\"\ncolour = 1",
                "unknown field",
            ),
        ] {
            let err = format!("{:#}", Tenants::parse(text, false).err().expect(text));
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    /// Attack: a tokens-file tenant named like the node agent's internal tenant would see and
    /// delete the Kubernetes sandboxes.
    #[test]
    fn the_node_agents_tenant_name_is_refused() {
        for name in ["kubernetes", "Kubernetes"] {
            let text = format!("[[tenants]]\nname = \"{name}\"\ntoken = \"12345678\"");
            let err = format!("{:#}", Tenants::parse(&text, false).err().unwrap());
            assert!(err.contains("reserved") && err.contains(name), "{err}");
        }
    }

    /// Attack: two tenants share a token (or its digest) and the last one silently wins, so the
    /// first tenant's requests act on the other's sandboxes.
    #[test]
    fn two_tenants_with_one_token_are_refused() {
        let plain = "[[tenants]]\nname = \"a\"\ntoken = \"12345678\"\n\
                     [[tenants]]\nname = \"b\"\ntoken = \"12345678\"";
        // sha256("12345678")
        let digest = "[[tenants]]\nname = \"a\"\ntoken = \"12345678\"\n\
                      [[tenants]]\nname = \"b\"\ntoken_sha256 = \
                      \"ef797c8118f02dfb649607dd5d3f8c7623048c9c063d532cc95c5ed7a898a64f\"";
        for text in [plain, digest] {
            let err = format!("{:#}", Tenants::parse(text, false).err().expect(text));
            assert!(err.contains("a and b have the same token"), "{err}");
        }
    }

    /// Attack: a tokens file other local users can read hands them every tenant's token. Refused
    /// like ssh refuses an open private key, also behind a symlink; 0600 and 0400 load.
    #[test]
    fn a_tokens_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        std::fs::write(&file, "[[tenants]]\nname = \"a\"\ntoken = \"12345678\"").unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            for path in [&file, &link] {
                let err = format!("{:#}", Tenants::load(path).err().unwrap());
                assert!(
                    err.contains(&format!("permissions {mode:04o}")) && err.contains("chmod 600"),
                    "{err}"
                );
            }
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(Tenants::load(&link).is_ok());
        }
    }

    #[test]
    fn tenants_map_to_namespaces_for_the_gateway() {
        let text = "[[tenants]]\nname = \"alice\"\ntoken = \"12345678\"\n\
                    [[tenants]]\nname = \"Bob_1\"\ntoken = \"87654321\"\n\
                    [[tenants]]\nname = \"carol\"\ntoken = \"abcdefgh\"\nnamespace = \"team-c\"";
        let tenants = Tenants::parse(text, false).unwrap();
        assert_eq!(tenants.namespace("alice"), Some("alice"));
        assert_eq!(tenants.namespace("Bob_1"), None, "not a namespace name");
        assert_eq!(tenants.namespace("carol"), Some("team-c"));
        let bad = "[[tenants]]\nname = \"a\"\ntoken = \"12345678\"\nnamespace = \"Kube_System\"";
        let err = format!("{:#}", Tenants::parse(bad, false).err().unwrap());
        assert!(err.contains("not a Kubernetes namespace name"), "{err}");
    }

    #[test]
    fn json_files_work_too() {
        let tenants =
            Tenants::parse(r#"{"tenants":[{"name":"a","token":"12345678"}]}"#, true).unwrap();
        assert_eq!(tenants.authenticate("12345678").unwrap().name, "a");
    }
}

//! Image references: `[registry/]repository[:tag][@digest]` with Docker Hub defaults, plus the offline
//! sources `oci-layout:DIR[:TAG]` and `oci-archive:FILE[:TAG]`. Pure parsing; touches nothing.

use std::fmt;
use std::path::PathBuf;

use crate::digest::Digest;

/// Docker Hub's canonical registry name and the host that actually serves its API.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_REFERENCE_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("invalid image reference {input:?}: {reason}")]
    Malformed { input: String, reason: String },
}

fn malformed(input: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::Malformed {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Registry(RegistryRef),
    /// An OCI image layout directory; `tag` selects a manifest by `org.opencontainers.image.ref.name`.
    OciLayout {
        dir: PathBuf,
        tag: Option<String>,
    },
    /// A tar archive of an OCI image layout.
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
}

/// A reference to an image in a registry, normalised (`alpine` -> `docker.io/library/alpine:latest`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// Registry host with optional port, as written (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path (`library/alpine`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl RegistryRef {
    /// The host to talk to: Docker Hub's API lives on a different host than its name.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Registry(r) => r.fmt(f),
            Reference::OciLayout { dir, tag } => {
                write!(f, "oci-layout:{}", dir.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
            Reference::OciArchive { file, tag } => {
                write!(f, "oci-archive:{}", file.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
        }
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        if let Some(rest) = input.strip_prefix("oci-layout:") {
            let (dir, tag) = split_path_tag(input, rest)?;
            return Ok(Reference::OciLayout { dir, tag });
        }
        if let Some(rest) = input.strip_prefix("oci-archive:") {
            let (file, tag) = split_path_tag(input, rest)?;
            return Ok(Reference::OciArchive { file, tag });
        }
        parse_registry_ref(input).map(Reference::Registry)
    }
}

/// `DIR[:TAG]`: the part after the last `:` is a tag only when it is a valid tag and holds no `/`,
/// so `oci-layout:/a/b` and `oci-layout:/a/b:v1` both read as expected.
fn split_path_tag(input: &str, rest: &str) -> Result<(PathBuf, Option<String>), ReferenceError> {
    let (path, tag) = match rest.rsplit_once(':') {
        Some((p, t)) if is_valid_tag(t) => (p, Some(t.to_string())),
        _ => (rest, None),
    };
    if path.is_empty() {
        return Err(malformed(input, "the path is empty"));
    }
    Ok((PathBuf::from(path), tag))
}

pub fn parse_registry_ref(input: &str) -> Result<RegistryRef, ReferenceError> {
    if input.is_empty() {
        return Err(malformed(input, "it is empty"));
    }
    if input.len() > MAX_REFERENCE_LEN {
        return Err(malformed(input, "it is longer than 4096 characters"));
    }
    let (name_tag, digest) = match input.split_once('@') {
        Some((n, d)) => {
            let digest = d
                .parse::<Digest>()
                .map_err(|e| malformed(input, e.to_string()))?;
            (n, Some(digest))
        }
        None => (input, None),
    };
    // A tag is the text after the last ':' that comes after the last '/' (a ':' before that is a port).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => {
            let tag = &name_tag[last_slash + i + 1..];
            if !is_valid_tag(tag) {
                return Err(malformed(
                    input,
                    format!(
                        "tag {tag:?} is not valid (allowed: [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
                    ),
                ));
            }
            (&name_tag[..last_slash + i], Some(tag.to_string()))
        }
        None => (name_tag, None),
    };
    let (registry, repository) = split_registry(name);
    let registry = match registry {
        Some(r) if r == "index.docker.io" || r == "registry-1.docker.io" => DOCKER_HUB.to_string(),
        Some(r) => {
            if !is_valid_registry(r) {
                return Err(malformed(
                    input,
                    format!("registry {r:?} is not a valid host[:port]"),
                ));
            }
            r.to_string()
        }
        None => DOCKER_HUB.to_string(),
    };
    if repository.is_empty() {
        return Err(malformed(input, "the repository name is empty"));
    }
    for component in repository.split('/') {
        if !is_valid_path_component(component) {
            return Err(malformed(
                input,
                format!(
                    "repository component {component:?} is not valid (lowercase letters, digits and \
                     single '.', '_', '__' or '-' separators)"
                ),
            ));
        }
    }
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_string()
    };
    let tag = if tag.is_none() && digest.is_none() {
        Some(DEFAULT_TAG.to_string())
    } else {
        tag
    };
    Ok(RegistryRef {
        registry,
        repository,
        tag,
        digest,
    })
}

/// Docker's rule: the first component is a registry if it has a '.' or ':' or is `localhost`.
fn split_registry(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

pub(crate) fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_valid_path_component(c: &str) -> bool {
    // [a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reg(s: &str) -> RegistryRef {
        parse_registry_ref(s).unwrap()
    }

    #[test]
    fn docker_hub_names_are_normalised() {
        assert_eq!(reg("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(reg("user/app:1.2").to_string(), "docker.io/user/app:1.2");
        assert_eq!(
            reg("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(reg("alpine").api_host(), "registry-1.docker.io");
    }

    #[test]
    fn registry_with_port_is_not_a_tag() {
        let r = reg("localhost:5000/a/b");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost:5000", "a/b")
        );
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = reg("127.0.0.1:5000/hearth-test/busybox:v1");
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", Some("v1"))
        );
        assert_eq!(r.api_host(), "127.0.0.1:5000");
    }

    #[test]
    fn digests_pin_without_defaulting_the_tag() {
        let hex = "a".repeat(64);
        let r = reg(&format!("quay.io/x/y@sha256:{hex}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), format!("sha256:{hex}"));
        let r = reg(&format!("x:1@sha256:{hex}"));
        assert_eq!(r.tag.as_deref(), Some("1"));
    }

    #[test]
    fn malformed_references_are_rejected_with_the_input() {
        for bad in [
            "",
            "UPPER",
            "a//b",
            "a:",
            "a:-x",
            "a@sha256:abc",
            "a@md5:00",
            "/a",
            "a/",
            "a..b",
            "host:x/a",
        ] {
            let err = parse_registry_ref(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn offline_sources_split_the_tag() {
        assert_eq!(
            Reference::parse("oci-layout:/a/b:v1").unwrap(),
            Reference::OciLayout {
                dir: "/a/b".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Reference::parse("oci-archive:./x.tar").unwrap(),
            Reference::OciArchive {
                file: "./x.tar".into(),
                tag: None
            }
        );
        assert!(Reference::parse("oci-layout:").is_err());
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}"
    }

    proptest! {
        #[test]
        fn canonical_form_round_trips(
            host in proptest::option::of("[a-z]{1,8}\\.[a-z]{2,5}(:[0-9]{1,5})?"),
            path in proptest::collection::vec(component(), 1..4),
            tag in proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
            digest in proptest::option::of("[0-9a-f]{64}"),
        ) {
            // Without a host, a first component with a '.' would itself read as a registry.
            prop_assume!(host.is_some() || !path[0].contains('.'));
            let mut s = String::new();
            if let Some(h) = &host { s.push_str(h); s.push('/'); }
            s.push_str(&path.join("/"));
            if let Some(t) = &tag { s.push(':'); s.push_str(t); }
            if let Some(d) = &digest { s.push_str("@sha256:"); s.push_str(d); }
            let parsed = parse_registry_ref(&s).unwrap();
            let again = parse_registry_ref(&parsed.to_string()).unwrap();
            prop_assert_eq!(&parsed, &again);
            prop_assert_eq!(parsed.tag.as_deref(), tag.as_deref().or(digest.is_none().then_some("latest")));
            if let Some(h) = &host { prop_assert_eq!(&parsed.registry, h); }
        }

        #[test]
        fn arbitrary_input_never_panics(s in "\\PC{0,64}") {
            let _ = Reference::parse(&s);
        }

        #[test]
        fn uppercase_repository_is_rejected(p in "[a-z]{0,4}[A-Z][a-z]{0,4}") {
            let input = format!("example.com/{}", p);
            prop_assert!(parse_registry_ref(&input).is_err());
        }
    }
}

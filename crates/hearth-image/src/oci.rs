//! OCI image-spec and Docker schema-2 document types (descriptors, manifests, indexes, image config)
//! and the platform choice in an index. Pure data; touches nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::untrusted::sanitize;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Everything `GET /v2/<name>/manifests/<ref>` may answer with that hearth understands.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// `detail` is serde's message, which may quote the document: sanitized.
    #[error("{what} is not valid JSON of the expected shape: {detail}")]
    Json { what: String, detail: String },
    #[error("{what} has media type {media_type:?}, which hearth does not support (expected an OCI or Docker schema-2 manifest or index)")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("{what} lists no manifest for platform {wanted}; available: {available}")]
    NoMatchingPlatform {
        what: String,
        wanted: Platform,
        available: String,
    },
    #[error("platform {0:?} is not of the form os/arch[/variant] (for example linux/amd64)")]
    BadPlatform(String),
    #[error("layer {digest} has media type {media_type:?}; supported: tar, tar+gzip, tar+zstd (OCI or Docker)")]
    UnsupportedLayer { digest: Digest, media_type: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// A manifest or index, told apart by media type (or, when absent, by shape).
#[derive(Debug)]
pub enum ManifestOrIndex {
    Manifest(Manifest),
    Index(Index),
}

impl ManifestOrIndex {
    pub fn parse(what: &str, media_type: Option<&str>, body: &[u8]) -> Result<Self, DocumentError> {
        let json = |source: serde_json::Error| DocumentError::Json {
            what: what.to_string(),
            detail: sanitize(source.to_string().as_bytes()),
        };
        let value: serde_json::Value = serde_json::from_slice(body).map_err(json)?;
        let declared = value
            .get("mediaType")
            .and_then(|m| m.as_str())
            .map(str::to_string);
        let mt = declared
            .as_deref()
            .or(media_type.filter(|m| !m.is_empty() && *m != "application/json"));
        let is_index = match mt {
            Some(MT_OCI_INDEX | MT_DOCKER_LIST) => true,
            Some(MT_OCI_MANIFEST | MT_DOCKER_MANIFEST) => false,
            None => value.get("manifests").is_some(),
            Some(other) => {
                return Err(DocumentError::UnsupportedMediaType {
                    what: what.to_string(),
                    media_type: sanitize(other.as_bytes()),
                })
            }
        };
        if is_index {
            Ok(ManifestOrIndex::Index(
                serde_json::from_value(value).map_err(json)?,
            ))
        } else {
            Ok(ManifestOrIndex::Manifest(
                serde_json::from_value(value).map_err(json)?,
            ))
        }
    }
}

/// The image configuration blob (only the parts hearth uses).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootfsSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RootfsSpec {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn of_layer(desc: &Descriptor) -> Result<Compression, DocumentError> {
        match desc.media_type.as_str() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(DocumentError::UnsupportedLayer {
                digest: desc.digest.clone(),
                media_type: sanitize(other.as_bytes()),
            }),
        }
    }
}

/// The platform to pick from an index: `linux/amd64` unless told otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        self.variant.iter().try_for_each(|v| write!(f, "/{v}"))
    }
}

impl FromStr for Platform {
    type Err = DocumentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(DocumentError::BadPlatform(s.to_string())),
        }
    }
}

impl Platform {
    fn matches(&self, spec: &PlatformSpec) -> bool {
        if spec.os != self.os || spec.architecture != self.architecture {
            return false;
        }
        match (&self.variant, &spec.variant) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            // arm64 images often omit the (only) variant v8.
            (Some(want), None) => self.architecture == "arm64" && want == "v8",
        }
    }

    /// Chooses the manifest for this platform, preferring an exact variant match.
    pub fn choose<'a>(
        &self,
        what: &str,
        index: &'a Index,
    ) -> Result<&'a Descriptor, DocumentError> {
        let candidates = index
            .manifests
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| self.matches(p)));
        let mut best: Option<&Descriptor> = None;
        for d in candidates {
            let exact =
                d.platform.as_ref().and_then(|p| p.variant.as_ref()) == self.variant.as_ref();
            if best.is_none() || exact {
                best = Some(d);
                if exact {
                    break;
                }
            }
        }
        best.ok_or_else(|| DocumentError::NoMatchingPlatform {
            what: what.to_string(),
            wanted: self.clone(),
            available: sanitize(
                index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref())
                    .map(|p| match &p.variant {
                        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                        None => format!("{}/{}", p.os, p.architecture),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
                    .as_bytes(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: Digest::of(&[n]),
            size: 1,
            platform: Some(PlatformSpec {
                os: "linux".into(),
                architecture: arch.into(),
                variant: variant.map(str::to_string),
            }),
            annotations: Default::default(),
        }
    }

    #[test]
    fn chooses_platform_and_names_the_alternatives() {
        let index = Index {
            media_type: None,
            manifests: vec![
                desc("arm", Some("v6"), 1),
                desc("arm", Some("v7"), 2),
                desc("amd64", None, 3),
            ],
        };
        assert_eq!(
            Platform::default().choose("x", &index).unwrap().digest,
            Digest::of(&[3])
        );
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(v7.choose("x", &index).unwrap().digest, Digest::of(&[2]));
        let err = "linux/s390x"
            .parse::<Platform>()
            .unwrap()
            .choose("x", &index)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("linux/arm/v6, linux/arm/v7, linux/amd64"),
            "{err}"
        );
    }

    #[test]
    fn tells_manifest_from_index_without_media_type() {
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            ManifestOrIndex::parse("x", None, idx).unwrap(),
            ManifestOrIndex::Index(_)
        ));
        let bad = br#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#;
        assert!(ManifestOrIndex::parse("x", None, bad).is_err());
    }

    #[test]
    fn platform_strings() {
        assert!("linux".parse::<Platform>().is_err());
        assert_eq!(
            "linux/arm64/v8".parse::<Platform>().unwrap().to_string(),
            "linux/arm64/v8"
        );
    }
}

/// A registry controls every string of a manifest; what of it reaches an error message (and so a
/// tenant's terminal or the daemon's log) must be short and printable.
#[cfg(test)]
mod hostile_text {
    use super::*;

    fn assert_tame(message: &str) {
        assert!(
            message.len() < 1000,
            "{} bytes: {message:.200}",
            message.len()
        );
        assert!(!message.contains('\x1b'), "escape code in {message:?}");
    }

    #[test]
    fn a_hostile_media_type_is_cut_and_stripped() {
        let media_type = format!("\x1b[2J{}", "x".repeat(100_000));
        let body = serde_json::json!({ "schemaVersion": 2, "mediaType": media_type });
        let err =
            ManifestOrIndex::parse("manifest", None, body.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, DocumentError::UnsupportedMediaType { .. }));
        assert_tame(&err.to_string());
    }

    #[test]
    fn serde_errors_quoting_the_document_are_cut_and_stripped() {
        let field = format!("\x1b]0;pwned\x07{}", "y".repeat(50_000));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_MANIFEST}","config":{{"mediaType":"{field}","digest":"{field}","size":1}},"layers":[]}}"#,
            field = field.replace('\x1b', "\\u001b").replace('\x07', "\\u0007")
        );
        let Err(err) = ManifestOrIndex::parse("manifest", None, body.as_bytes()) else {
            panic!("a bad config descriptor was accepted");
        };
        assert!(matches!(err, DocumentError::Json { .. }), "{err}");
        assert_tame(&err.to_string());
    }

    #[test]
    fn hostile_platform_names_are_cut_and_stripped() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let manifests: Vec<_> = (0..500)
            .map(|i| {
                serde_json::json!({
                    "mediaType": MT_OCI_MANIFEST, "digest": digest, "size": 1,
                    "platform": { "os": format!("\x1b[31mos{i}"), "architecture": "z".repeat(200) }
                })
            })
            .collect();
        let body = serde_json::json!({ "schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests });
        let ManifestOrIndex::Index(index) =
            ManifestOrIndex::parse("index", None, body.to_string().as_bytes()).unwrap()
        else {
            panic!("not an index");
        };
        let err = Platform::default().choose("index", &index).unwrap_err();
        assert_tame(&err.to_string());
    }
}

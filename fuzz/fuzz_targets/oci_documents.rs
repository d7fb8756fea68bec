//! Fuzzes the registry documents hearth reads from untrusted registries: manifests and indexes
//! (`ManifestOrIndex::parse` under each media type a registry may claim), platform selection from an
//! index, layer compression from a manifest's descriptors, and the image configuration. None of them
//! may panic, whatever the bytes.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run oci_documents -- -max_total_time=60`
#![no_main]

use hearth_image::oci::{Compression, ConfigFile, ManifestOrIndex};
use hearth_image::Platform;
use libfuzzer_sys::fuzz_target;

const MEDIA_TYPES: [Option<&str>; 6] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/json"),
];

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let media_type = MEDIA_TYPES[*selector as usize % MEDIA_TYPES.len()];
    match ManifestOrIndex::parse("fuzzed document", media_type, body) {
        Ok(ManifestOrIndex::Index(index)) => {
            for platform in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"] {
                let platform: Platform = platform.parse().unwrap();
                let _ = platform.choose("fuzzed index", &index);
            }
        }
        Ok(ManifestOrIndex::Manifest(manifest)) => {
            for layer in &manifest.layers {
                let _ = Compression::of_layer(layer);
            }
        }
        Err(_) => {}
    }
    let _ = serde_json::from_slice::<ConfigFile>(body);
});

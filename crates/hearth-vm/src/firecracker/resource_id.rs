//! [`ResourceId`]: the id rule Firecracker enforces on `drive_id`, `iface_id` and the like, which its
//! swagger file does not state; `tests/firecracker_binary.rs` checks it against the real binary.
//! Pure logic: no I/O.

use std::fmt;

use serde::Serialize;

/// The id of an API resource (`drive_id`, `iface_id`, ...), which is also a path segment
/// (`PUT /drives/{id}`). Firecracker's `checked_id` (src/firecracker/src/api_server/parsed_request.rs)
/// refuses an empty id ("The ID cannot be empty.") and any character but alphanumerics and `_`
/// (400 "API Resource IDs can only contain alphanumeric characters and underscores."); its swagger
/// file says neither. Firecracker bounds no resource id's length; hearth keeps them to
/// [`ResourceId::MAX_LEN`], Firecracker's own bound on instance ids, and to ASCII, though Firecracker
/// would take any Unicode alphanumeric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ResourceId(String);

/// Why a string is not a [`ResourceId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidResourceId {
    #[error("a Firecracker resource id cannot be empty")]
    Empty,
    #[error(
        "Firecracker resource id {0:?} is longer than {max} bytes",
        max = ResourceId::MAX_LEN
    )]
    TooLong(String),
    #[error(
        "Firecracker resource id {0:?} may contain only ASCII letters, digits and underscores"
    )]
    Character(String),
}

impl ResourceId {
    pub const MAX_LEN: usize = 64;

    /// `id` as is, if Firecracker accepts it.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidResourceId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidResourceId::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidResourceId::TooLong(id));
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(InvalidResourceId::Character(id));
        }
        Ok(ResourceId(id))
    }

    /// A valid id derived from a name that may not be one (a drive serial such as `hearth-rootfs`):
    /// every other character becomes `_`, the result is cut to [`ResourceId::MAX_LEN`], and an empty
    /// name becomes `_`.
    pub fn from_name(name: &str) -> Self {
        let mut id: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(Self::MAX_LEN)
            .collect();
        if id.is_empty() {
            id.push('_');
        }
        ResourceId(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ResourceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ResourceId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ResourceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Drive ids for drives named by `serials`, in order: each serial mapped by
/// [`ResourceId::from_name`]; serials that map to the same id (`a-b`, `a_b`) get `_2`, `_3`, ...
/// so that no `PUT /drives/{id}` overwrites another drive.
pub fn drive_ids<'a>(serials: impl IntoIterator<Item = &'a str>) -> Vec<ResourceId> {
    let mut ids: Vec<ResourceId> = Vec::new();
    for serial in serials {
        let base = ResourceId::from_name(serial);
        let mut id = base.clone();
        let mut n = 2;
        while ids.contains(&id) {
            let suffix = format!("_{n}");
            let keep = base.0.len().min(ResourceId::MAX_LEN - suffix.len());
            id = ResourceId(format!("{}{suffix}", &base.0[..keep]));
            n += 1;
        }
        ids.push(id);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_are_ascii_letters_digits_and_underscores() {
        for ok in [
            "hearth_rootfs",
            "a",
            "_",
            "Drive0",
            &"x".repeat(ResourceId::MAX_LEN),
        ] {
            assert_eq!(ResourceId::new(ok).unwrap().as_str(), ok);
        }
        assert_eq!(ResourceId::new(""), Err(InvalidResourceId::Empty));
        for bad in ["hearth-rootfs", "a b", "a/b", "a.b", "dr\u{e9}ve", "x\n"] {
            assert!(
                matches!(ResourceId::new(bad), Err(InvalidResourceId::Character(_))),
                "{bad:?} accepted"
            );
        }
        let long = "x".repeat(ResourceId::MAX_LEN + 1);
        assert!(matches!(
            ResourceId::new(long),
            Err(InvalidResourceId::TooLong(_))
        ));
    }

    #[test]
    fn names_map_to_valid_ids() {
        assert_eq!(ResourceId::from_name(crate::ROOTFS_SERIAL), "hearth_rootfs");
        assert_eq!(
            ResourceId::from_name(crate::SCRATCH_SERIAL),
            "hearth_scratch"
        );
        assert_eq!(ResourceId::from_name(""), "_");
        assert_eq!(ResourceId::from_name("d\u{e9}j\u{e0}"), "d_j_");
        let long = ResourceId::from_name(&"y".repeat(100));
        assert_eq!(long.as_str().len(), ResourceId::MAX_LEN);
        for name in [
            "hearth-rootfs",
            "",
            "a.b/c d",
            "\u{e9}t\u{e9}",
            &"z-".repeat(50),
        ] {
            let id = ResourceId::from_name(name);
            assert_eq!(ResourceId::new(id.as_str()).as_ref(), Ok(&id), "{name:?}");
        }
    }

    #[test]
    fn serials_that_map_alike_get_distinct_drive_ids() {
        let ids = drive_ids(["hearth-rootfs", "hearth_rootfs", "hearth-rootfs", "other"]);
        assert_eq!(
            ids,
            [
                "hearth_rootfs",
                "hearth_rootfs_2",
                "hearth_rootfs_3",
                "other"
            ]
        );
        let long = "q".repeat(ResourceId::MAX_LEN);
        let ids = drive_ids([long.as_str(), long.as_str()]);
        assert_ne!(ids[0], ids[1]);
        assert!(ids.iter().all(|id| ResourceId::new(id.as_str()).is_ok()));
    }
}

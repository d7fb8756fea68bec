//! Resolving `user[:group]` (names or numbers) against the workload's /etc/passwd and /etc/group
//! the way docker does: a numeric user without a passwd entry runs with gid 0 and HOME `/`; root
//! (the default) needs no entry either, so images without /etc (`FROM scratch` around a static
//! binary) run as uid 0, gid 0, HOME `/`; any other name must exist; supplementary groups are the
//! groups that list the user as a member. Pure functions over file contents.

/// Whom the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Why `user[:group]` names nobody in the image. Each says what the image lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error(
        "unable to find user {0}: the image has no /etc/passwd (without one, only root and \
         numeric UID[:GID] work)"
    )]
    NoPasswdFile(String),
    #[error("unable to find user {0}: the image's /etc/passwd has no entry for it")]
    NoPasswdEntry(String),
    #[error(
        "unable to find group {0}: the image has no /etc/group (without one, only numeric \
         GIDs work)"
    )]
    NoGroupFile(String),
    #[error("unable to find group {0}: the image's /etc/group has no entry for it")]
    NoGroupEntry(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: fields[0],
            gid: fields[2].parse().ok()?,
            members: fields[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolves `spec` (`None` or empty = root). `passwd`/`group` are the files' contents, `None` when
/// the image lacks them.
pub fn resolve(
    spec: Option<&str>,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ResolvedUser, UserError> {
    let spec = spec.unwrap_or("");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let numeric_user: Option<u32> = user_part.parse().ok();
    let entry = passwd_entries(passwd.unwrap_or("")).find(|e| match numeric_user {
        Some(uid) => e.uid == uid,
        None => e.name == user_part,
    });
    // Without a passwd entry a number is still a uid, and root by name is still uid 0.
    let fallback_uid = numeric_user.or((user_part == "root").then_some(0));
    let mut user = match (&entry, fallback_uid) {
        (Some(entry), _) => ResolvedUser {
            uid: entry.uid,
            gid: entry.gid,
            groups: Vec::new(),
            home: entry.home.to_string(),
        },
        (None, Some(uid)) => ResolvedUser {
            uid,
            gid: 0,
            groups: Vec::new(),
            home: "/".to_string(),
        },
        (None, None) if passwd.is_none() => {
            return Err(UserError::NoPasswdFile(user_part.to_string()))
        }
        (None, None) => return Err(UserError::NoPasswdEntry(user_part.to_string())),
    };
    if let Some(group_part) = group_part.filter(|g| !g.is_empty()) {
        let numeric_group: Option<u32> = group_part.parse().ok();
        let found = group_entries(group.unwrap_or("")).find(|g| match numeric_group {
            Some(gid) => g.gid == gid,
            None => g.name == group_part,
        });
        user.gid = match (found, numeric_group) {
            (Some(found), _) => found.gid,
            (None, Some(gid)) => gid,
            (None, None) if group.is_none() => {
                return Err(UserError::NoGroupFile(group_part.to_string()))
            }
            (None, None) => return Err(UserError::NoGroupEntry(group_part.to_string())),
        };
    }
    if let Some(entry) = entry {
        user.groups = group_entries(group.unwrap_or(""))
            .filter(|g| g.members.contains(&entry.name))
            .map(|g| g.gid)
            .collect();
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nwheel:x:10:root,app\naudio:x:29:app\napp:x:1000:\nnogroup:x:65534:\n";

    fn resolve_ok(spec: Option<&str>) -> ResolvedUser {
        resolve(spec, Some(PASSWD), Some(GROUP)).unwrap()
    }

    #[test]
    fn default_is_root_with_its_home_and_groups() {
        let root = resolve_ok(None);
        assert_eq!(
            (root.uid, root.gid, root.home.as_str(), root.groups),
            (0, 0, "/root", vec![10])
        );
        assert_eq!(resolve_ok(Some("")), resolve_ok(None));
    }

    #[test]
    fn names_and_numbers_resolve_to_the_same_user() {
        let by_name = resolve_ok(Some("app"));
        assert_eq!(
            (by_name.uid, by_name.gid, by_name.groups.clone()),
            (1000, 1000, vec![10, 29])
        );
        assert_eq!(resolve_ok(Some("1000")), by_name);
    }

    #[test]
    fn explicit_group_by_name_or_number() {
        assert_eq!(resolve_ok(Some("app:audio")).gid, 29);
        assert_eq!(resolve_ok(Some("app:4242")).gid, 4242);
        assert_eq!(resolve_ok(Some("nobody:nogroup")).gid, 65534);
    }

    #[test]
    fn unknown_numeric_user_runs_with_gid_0_and_home_slash() {
        let user = resolve(Some("4321"), None, None).unwrap();
        assert_eq!((user.uid, user.gid, user.home.as_str()), (4321, 0, "/"));
        assert_eq!(resolve(Some("4321:99"), None, None).unwrap().gid, 99);
    }

    #[test]
    fn root_needs_no_passwd_entry() {
        let root = ResolvedUser {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: "/".to_string(),
        };
        for spec in [
            None,
            Some(""),
            Some("root"),
            Some("0"),
            Some("root:0"),
            Some("0:0"),
        ] {
            assert_eq!(resolve(spec, None, None), Ok(root.clone()), "{spec:?}");
        }
        let no_root = "app:x:1000:1000::/home/app:/bin/sh\n";
        assert_eq!(resolve(Some("root"), Some(no_root), Some(GROUP)), Ok(root));
    }

    #[test]
    fn numeric_ids_need_neither_file() {
        let user = resolve(Some("1234:5678"), None, None).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str(), user.groups),
            (1234, 5678, "/", vec![])
        );
    }

    #[test]
    fn names_missing_from_the_image_say_which_file_lacks_them() {
        let error = |spec, passwd, group| resolve(Some(spec), passwd, group).unwrap_err();
        assert_eq!(
            error("nobody", None, None).to_string(),
            "unable to find user nobody: the image has no /etc/passwd (without one, only root \
             and numeric UID[:GID] work)"
        );
        assert_eq!(
            error("ghost", Some(PASSWD), Some(GROUP)).to_string(),
            "unable to find user ghost: the image's /etc/passwd has no entry for it"
        );
        assert_eq!(
            error("root:wheel", None, None).to_string(),
            "unable to find group wheel: the image has no /etc/group (without one, only \
             numeric GIDs work)"
        );
        assert_eq!(
            error("app:ghosts", Some(PASSWD), Some(GROUP)).to_string(),
            "unable to find group ghosts: the image's /etc/group has no entry for it"
        );
    }
}

//! Resolving `user[:group]` (names or numbers) against the workload's /etc/passwd and /etc/group
//! the way docker does: a numeric user without a passwd entry runs with gid 0 and HOME `/`; a name
//! must exist; supplementary groups are the groups that list the user as a member. Pure functions
//! over file contents.

/// Whom the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
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
/// the image lacks them. Errors read like docker's.
pub fn resolve(
    spec: Option<&str>,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ResolvedUser, String> {
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
    let mut user = match (&entry, numeric_user) {
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
        (None, None) => {
            return Err(format!(
                "unable to find user {user_part}: no matching entries in passwd file"
            ))
        }
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
            (None, None) => {
                return Err(format!(
                    "unable to find group {group_part}: no matching entries in group file"
                ))
            }
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
    fn unknown_names_are_errors_like_dockers() {
        assert_eq!(
            resolve(Some("ghost"), Some(PASSWD), Some(GROUP)).unwrap_err(),
            "unable to find user ghost: no matching entries in passwd file"
        );
        assert_eq!(
            resolve(Some("app:ghosts"), Some(PASSWD), Some(GROUP)).unwrap_err(),
            "unable to find group ghosts: no matching entries in group file"
        );
    }
}

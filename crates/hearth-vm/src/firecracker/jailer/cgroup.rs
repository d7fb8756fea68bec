//! The host's cgroup layout as Firecracker's jailer sees it: which hierarchies it would put a VM's
//! CPU and memory limits in, the `--cgroup` keys that version takes, and where the per-VM cgroup
//! directories end up. Read from `/proc/mounts` (the jailer's own source) and the cgroup2 mount's
//! `cgroup.controllers`; [`CgroupLayout::from_mounts`] is the pure part.

use std::path::{Path, PathBuf};

/// What the jailer reads to find cgroup hierarchies (its `PROC_MOUNTS`).
const PROC_MOUNTS: &str = "/proc/mounts";

/// The host's cgroup hierarchies for the CPU and memory limits, as the jailer finds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v2: the first cgroup2 mount in `/proc/mounts` (the one the jailer uses), whose
    /// `cgroup.controllers` offers `cpu` and `memory`.
    V2 { root: PathBuf },
    /// cgroup v1: the first v1 hierarchies whose mount options name `cpu` and `memory` (one path
    /// twice when both are mounted together), and `pids` where mounted (the jailer does not use
    /// it; hearth's own VMM cgroups do, see `crate::confine`).
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: Option<PathBuf>,
    },
}

/// Why the host's cgroup layout cannot carry the jailer's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0}: hearth needs cgroup v2 with the cpu and memory controllers enabled, or cgroup v1 cpu and \
     memory hierarchies"
)]
pub struct NoCgroupLayout(String);

impl CgroupLayout {
    /// This host's layout, from `/proc/mounts` and the cgroup2 mount's `cgroup.controllers`.
    pub fn detect() -> Result<Self, NoCgroupLayout> {
        let mounts = std::fs::read_to_string(PROC_MOUNTS)
            .map_err(|e| NoCgroupLayout(format!("reading {PROC_MOUNTS}: {e}")))?;
        Self::from_mounts(&mounts, |root| {
            std::fs::read_to_string(root.join("cgroup.controllers")).ok()
        })
    }

    /// The layout `mounts` (the text of `/proc/mounts`) describes; `controllers` reads a cgroup2
    /// mount's `cgroup.controllers`. v2 wins when usable: a controller is in one hierarchy only.
    pub fn from_mounts(
        mounts: &str,
        controllers: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self, NoCgroupLayout> {
        // "<device> <dir> <type> <options> 0 0", with spaces in <dir> escaped as \040.
        let entries: Vec<(&str, &str, &str)> = mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (_device, dir, kind, options) = (
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                );
                Some((dir, kind, options))
            })
            .collect();
        let unified = entries
            .iter()
            .find(|(_, kind, _)| *kind == "cgroup2")
            .map(|(dir, _, _)| unescape(dir));
        if let Some(root) = &unified {
            let offered = controllers(root).unwrap_or_default();
            let offered: Vec<&str> = offered.split_whitespace().collect();
            if offered.contains(&"cpu") && offered.contains(&"memory") {
                return Ok(CgroupLayout::V2 { root: root.clone() });
            }
        }
        let v1 = |controller: &str| {
            entries
                .iter()
                .find(|(_, kind, options)| {
                    *kind == "cgroup" && options.split(',').any(|o| o == controller)
                })
                .map(|(dir, _, _)| unescape(dir))
        };
        match (v1("cpu"), v1("memory")) {
            (Some(cpu), Some(memory)) => Ok(CgroupLayout::V1 {
                cpu,
                memory,
                pids: v1("pids"),
            }),
            _ => Err(NoCgroupLayout(match unified {
                Some(root) => format!(
                    "the cgroup2 hierarchy at {} does not offer both the cpu and memory \
                     controllers, and they are not mounted as cgroup v1 either",
                    root.display()
                ),
                None => "no cgroup2 mount and no cgroup v1 cpu and memory hierarchies".to_owned(),
            })),
        }
    }

    /// The `--cgroup-version` the jailer needs for this layout.
    pub fn version(&self) -> u8 {
        match self {
            CgroupLayout::V2 { .. } => 2,
            CgroupLayout::V1 { .. } => 1,
        }
    }

    /// The jailer's `--cgroup` values for this version: CPU time `quota_us` per `period_us`,
    /// memory `memory_bytes`.
    pub fn limits(&self, quota_us: u64, period_us: u64, memory_bytes: u64) -> Vec<String> {
        match self {
            CgroupLayout::V2 { .. } => vec![
                format!("cpu.max={quota_us} {period_us}"),
                format!("memory.max={memory_bytes}"),
            ],
            CgroupLayout::V1 { .. } => vec![
                format!("cpu.cfs_quota_us={quota_us}"),
                format!("cpu.cfs_period_us={period_us}"),
                format!("memory.limit_in_bytes={memory_bytes}"),
            ],
        }
    }

    /// The directories the jailer creates for cgroup `<parent>/<id>`: one per hierarchy it writes
    /// limits in (it creates them with `create_dir_all` under each hierarchy's mount point).
    pub fn dirs(&self, parent: &str, id: &str) -> Vec<PathBuf> {
        let hierarchies = match self {
            CgroupLayout::V2 { root } => vec![root],
            CgroupLayout::V1 { cpu, memory, .. } if cpu == memory => vec![cpu],
            CgroupLayout::V1 { cpu, memory, .. } => vec![cpu, memory],
        };
        hierarchies
            .into_iter()
            .map(|h| h.join(parent).join(id))
            .collect()
    }

    /// Where a cgroup `<parent>/<id>` limiting memory to `memory_bytes` and tasks to `pids_max`
    /// lives, as (directory, [(limit file, value)]) per hierarchy, in the order to create them.
    /// v2: one directory with `memory.max` and `pids.max`; v1: the memory hierarchy's
    /// `memory.limit_in_bytes` and, where the pids controller is mounted, its `pids.max`.
    pub fn memory_and_pids(
        &self,
        parent: &str,
        id: &str,
        memory_bytes: u64,
        pids_max: u64,
    ) -> Vec<(PathBuf, Vec<(&'static str, String)>)> {
        match self {
            CgroupLayout::V2 { root } => vec![(
                root.join(parent).join(id),
                vec![
                    ("memory.max", memory_bytes.to_string()),
                    ("pids.max", pids_max.to_string()),
                ],
            )],
            CgroupLayout::V1 { memory, pids, .. } => {
                let mut dirs = vec![(
                    memory.join(parent).join(id),
                    vec![("memory.limit_in_bytes", memory_bytes.to_string())],
                )];
                if let Some(pids) = pids {
                    dirs.push((
                        pids.join(parent).join(id),
                        vec![("pids.max", pids_max.to_string())],
                    ));
                }
                dirs
            }
        }
    }

    /// Where cgroup `<parent>/<id>` lives in the v1 cpu hierarchy, when that is not the memory
    /// hierarchy's (`memory_and_pids` has it then). v2: `None`, its one directory takes the cpu
    /// controller when `<parent>` hands it down.
    pub fn cpu_apart(&self, parent: &str, id: &str) -> Option<PathBuf> {
        match self {
            CgroupLayout::V1 { cpu, memory, .. } if cpu != memory => {
                Some(cpu.join(parent).join(id))
            }
            _ => None,
        }
    }
}

/// `/proc/mounts` escapes space, tab, newline and backslash as three octal digits.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This workplace's machines: v1 controllers, an empty unified hierarchy.
    const HYBRID_V1: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    /// A systemd host with only the unified hierarchy.
    const PURE_V2: &str = "\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
";

    fn offers(list: &'static str) -> impl Fn(&Path) -> Option<String> {
        move |_| Some(list.to_owned())
    }

    #[test]
    fn detects_v1_controllers_beside_an_empty_unified_hierarchy() {
        let layout = CgroupLayout::from_mounts(HYBRID_V1, offers("hugetlb\n")).unwrap();
        assert_eq!(
            layout,
            CgroupLayout::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: Some("/sys/fs/cgroup/pids".into()),
            }
        );
        assert_eq!(layout.version(), 1);
        assert_eq!(
            layout.memory_and_pids("hearth", "vm1", 1 << 29, 64),
            [
                (
                    PathBuf::from("/sys/fs/cgroup/memory/hearth/vm1"),
                    vec![("memory.limit_in_bytes", "536870912".to_owned())]
                ),
                (
                    PathBuf::from("/sys/fs/cgroup/pids/hearth/vm1"),
                    vec![("pids.max", "64".to_owned())]
                ),
            ]
        );
        assert_eq!(
            layout.cpu_apart("hearth", "vm1"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/hearth/vm1"))
        );
        // cpu mounted with memory: the memory directory is in the cpu hierarchy already.
        let together = CgroupLayout::V1 {
            cpu: "/sys/fs/cgroup/cpu,memory".into(),
            memory: "/sys/fs/cgroup/cpu,memory".into(),
            pids: None,
        };
        assert_eq!(together.cpu_apart("hearth", "vm1"), None);
        // Co-mounted controllers (cpu,cpuacct) are found by option, not by directory name.
        let comounted = HYBRID_V1.replace(
            "/sys/fs/cgroup/cpu cgroup rw,relatime,cpu ",
            "/sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct ",
        );
        let layout = CgroupLayout::from_mounts(&comounted, offers("")).unwrap();
        assert!(
            matches!(&layout, CgroupLayout::V1 { cpu, .. } if cpu == Path::new("/sys/fs/cgroup/cpu,cpuacct")),
            "{layout:?}"
        );
    }

    #[test]
    fn detects_v2_where_the_unified_hierarchy_offers_cpu_and_memory() {
        let seen = std::cell::RefCell::new(Vec::new());
        let layout = CgroupLayout::from_mounts(PURE_V2, |root| {
            seen.borrow_mut().push(root.to_owned());
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        })
        .unwrap();
        assert_eq!(
            layout,
            CgroupLayout::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        assert_eq!(layout.version(), 2);
        assert_eq!(*seen.borrow(), [PathBuf::from("/sys/fs/cgroup")]);
        // The same mount without the memory controller delegated is not usable.
        let error = CgroupLayout::from_mounts(PURE_V2, offers("cpu pids")).unwrap_err();
        assert!(error.to_string().contains("/sys/fs/cgroup"), "{error}");
    }

    #[test]
    fn hosts_without_cpu_and_memory_hierarchies_are_refused_with_the_reason() {
        let error = CgroupLayout::from_mounts("proc /proc proc rw 0 0\n", offers("")).unwrap_err();
        assert!(error.to_string().contains("no cgroup2 mount"), "{error}");
        let no_memory: String = HYBRID_V1
            .lines()
            .filter(|l| !l.contains("memory"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(CgroupLayout::from_mounts(&no_memory, offers("")).is_err());
    }

    #[test]
    fn keys_and_directories_follow_the_version() {
        let v1 = CgroupLayout::from_mounts(HYBRID_V1, offers("")).unwrap();
        assert_eq!(
            v1.limits(200_000, 100_000, 1 << 29),
            [
                "cpu.cfs_quota_us=200000",
                "cpu.cfs_period_us=100000",
                "memory.limit_in_bytes=536870912"
            ]
        );
        assert_eq!(
            v1.dirs("firecracker", "vm1"),
            [
                PathBuf::from("/sys/fs/cgroup/cpu/firecracker/vm1"),
                PathBuf::from("/sys/fs/cgroup/memory/firecracker/vm1"),
            ]
        );
        let v2 = CgroupLayout::from_mounts(PURE_V2, offers("cpu memory")).unwrap();
        assert_eq!(
            v2.limits(200_000, 100_000, 1 << 29),
            ["cpu.max=200000 100000", "memory.max=536870912"]
        );
        assert_eq!(
            v2.dirs("firecracker", "vm1"),
            [PathBuf::from("/sys/fs/cgroup/firecracker/vm1")]
        );
        assert_eq!(
            v2.memory_and_pids("hearth", "vm1", 1 << 29, 64),
            [(
                PathBuf::from("/sys/fs/cgroup/hearth/vm1"),
                vec![
                    ("memory.max", "536870912".to_owned()),
                    ("pids.max", "64".to_owned())
                ]
            )]
        );
        assert_eq!(v2.cpu_apart("hearth", "vm1"), None);
        let together = CgroupLayout::V1 {
            cpu: "/c".into(),
            memory: "/c".into(),
            pids: None,
        };
        assert_eq!(together.dirs("p", "i"), [PathBuf::from("/c/p/i")]);
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let mounts = "cgroup2 /sys/fs/my\\040cgroups cgroup2 rw 0 0\n";
        let layout = CgroupLayout::from_mounts(mounts, offers("cpu memory")).unwrap();
        assert_eq!(
            layout,
            CgroupLayout::V2 {
                root: "/sys/fs/my cgroups".into()
            }
        );
    }
}

//! A cgroup of its own for each confined VMM, limiting its memory (guest RAM plus the VMM's own
//! overhead) and its number of tasks. The host's layout (v1 or v2) is detected by the jailer's
//! [`CgroupLayout`]; the directories are `<hierarchy>/hearth/<name>`. The VMM enters the cgroup
//! between fork and exec (`crate::process` writes `0` to each `cgroup.procs` opened here), so it
//! never runs unlimited. The directories are removed after the VMM exits (`VmProcess` leftovers).
//! Touches only the `hearth` cgroups it creates.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::firecracker::jailer::CgroupLayout;

/// The parent cgroup of every VMM cgroup hearth creates itself.
pub const PARENT: &str = "hearth";

/// A VMM's cgroup: its directories (one per hierarchy) and their `cgroup.procs`, open for the
/// child to write itself into.
#[derive(Debug)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
    pub procs: Vec<File>,
}

impl VmCgroup {
    /// Creates `hearth/<name>` in each hierarchy of this host's layout with the limits set. Fails
    /// (removing what it created) when a limit cannot be set: a VMM is never started unlimited.
    pub fn create(name: &str, memory_bytes: u64, pids_max: u64) -> io::Result<VmCgroup> {
        let layout = CgroupLayout::detect().map_err(io::Error::other)?;
        let mut cgroup = VmCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for (dir, limits) in layout.memory_and_pids(PARENT, name, memory_bytes, pids_max) {
            if let Err(e) = cgroup.add(&layout, &dir, &limits) {
                cgroup.remove();
                return Err(io::Error::new(
                    e.kind(),
                    format!("setting up the VMM's cgroup {}: {e}", dir.display()),
                ));
            }
        }
        Ok(cgroup)
    }

    fn add(
        &mut self,
        layout: &CgroupLayout,
        dir: &Path,
        limits: &[(&'static str, String)],
    ) -> io::Result<()> {
        let parent = dir.parent().expect("a cgroup under its parent");
        std::fs::create_dir_all(parent)?;
        if let CgroupLayout::V2 { root } = layout {
            // v2 hands controllers down level by level; both may be on already.
            for level in [root.as_path(), parent] {
                std::fs::write(level.join("cgroup.subtree_control"), "+memory +pids")?;
            }
        }
        if let Err(e) = std::fs::create_dir(dir) {
            // Left by a VMM of a hearth that died; empty once that VMM is gone.
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        self.dirs.push(dir.to_owned());
        for (file, value) in limits {
            std::fs::write(dir.join(file), value)?;
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        self.procs.push(procs);
        Ok(())
    }

    /// Removes the directories (the VMM never started, or has exited).
    pub fn remove(&self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes cgroup `hearth/<name>` of a VMM that is gone, in every hierarchy; `true` when none
    /// of its directories is left (a directory that still has a task cannot be removed).
    pub fn remove_named(name: &str) -> bool {
        let Ok(layout) = CgroupLayout::detect() else {
            return true;
        };
        layout
            .memory_and_pids(PARENT, name, 0, 0)
            .into_iter()
            .all(|(dir, _)| match std::fs::remove_dir(&dir) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            })
    }
}

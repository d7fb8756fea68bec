//! A cgroup of its own for each confined VMM, limiting its memory (guest RAM plus the VMM's own
//! overhead) and its number of tasks, and in the cpu controller's hierarchy too, so that all VMMs
//! together, under `hearth`, weigh as one group against the rest of the host: however busy the
//! guests, the daemon's threads (outside `hearth`) get the CPU when they wake (the soak's /healthz
//! latency under guest load), and each VM gets its share whatever its thread count. The cpu part
//! is best effort: a host that will not hand the controller down still runs its VMs (logged). The
//! host's layout (v1 or v2) is detected by the jailer's [`CgroupLayout`]; the directories are
//! `<hierarchy>/hearth/<name>`. The VMM enters the cgroup between fork and exec (`crate::process`
//! writes `0` to each `cgroup.procs` opened here), so it never runs unlimited. The directories are
//! removed after the VMM exits (`VmProcess` leftovers). Touches only the `hearth` cgroups it
//! creates.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::firecracker::jailer::CgroupLayout;

/// The parent cgroup of every VMM cgroup hearth creates itself.
pub const PARENT: &str = "hearth";

/// The host refused the cpu controller once already (said once, not per VM).
static CPU_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
        if let Some(dir) = layout.cpu_apart(PARENT, name) {
            if let Err(e) = cgroup.add(&layout, &dir, &[]) {
                tracing::warn!(cgroup = %dir.display(), "the VMM runs outside hearth's cpu cgroup: {e}");
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
            // Best effort (see the module docs): the controller is refused while, for one, a
            // realtime task runs outside the root cgroup.
            for level in [root.as_path(), parent] {
                if let Err(e) = std::fs::write(level.join("cgroup.subtree_control"), "+cpu") {
                    if !CPU_REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(cgroup = %level.display(), "no cpu controller for hearth's VMMs: {e}");
                    }
                    break;
                }
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
            .map(|(dir, _)| dir)
            .chain(layout.cpu_apart(PARENT, name))
            .all(|dir| match std::fs::remove_dir(&dir) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            })
    }
}

//! The record of a VM's spec that lets a saved VM be started again identically: what a run
//! directory keeps for a process that adopts the VM and later pauses or forks it
//! ([`SPEC_RECORD`], written by [`record_spec`] at boot), and what a snapshot's meta file carries
//! (`crate::pause`). Paths inside the run directory (sockets, console, scratch disk) are rebuilt
//! for the new one. Pure data and two small file operations.

use std::path::{Path, PathBuf};

use hearth_vm::{
    Drive, GuestMemory, KernelCmdline, MachineRevision, NetworkInterface, VmSpec, SCRATCH_SERIAL,
};
use serde::{Deserialize, Serialize};

use crate::pause::SCRATCH_FILE;

/// In a run directory: the spec the VM was started with, for a process that adopts it and later
/// pauses it (`hearth-spec.json`).
pub(crate) const SPEC_RECORD: &str = "hearth-spec.json";

/// The parts of a [`VmSpec`] that must be the same when the saved VM is started again; paths
/// inside the run directory (sockets, console, scratch disk) are rebuilt for the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SpecRecord {
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: Vec<String>,
    vcpus: u32,
    memory_mib: u32,
    drives: Vec<DriveRecord>,
    network: Option<NicRecord>,
    /// The boot template whose memory file the VM maps (restored from a template); absent in
    /// records written before guest memory was file-backed, and for cold-booted VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    template_memory: Option<PathBuf>,
    /// The VM's [`MachineRevision`]; absent in records written before revisions were kept, whose
    /// VMs all ran on the machine with a PIT.
    #[serde(default = "machine_before_revisions")]
    machine: u32,
}

fn machine_before_revisions() -> u32 {
    MachineRevision::WITH_PIT.0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DriveRecord {
    serial: String,
    /// Unused for the scratch disk, which lives in the snapshot or run directory.
    path: PathBuf,
    read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NicRecord {
    tap: String,
    mac: String,
    netns: Option<PathBuf>,
}

impl SpecRecord {
    pub(crate) fn of(spec: &VmSpec) -> SpecRecord {
        SpecRecord {
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            cmdline: spec.cmdline.params().to_vec(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            template_memory: match &spec.memory {
                GuestMemory::FromTemplate(file)
                | GuestMemory::TemplateFile(file)
                | GuestMemory::Saved(file) => Some(file.clone()),
                GuestMemory::Anonymous => None,
            },
            machine: spec.machine.0,
            drives: spec
                .drives
                .iter()
                .map(|d| DriveRecord {
                    serial: d.serial.clone(),
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            network: spec.network.as_ref().map(|n| NicRecord {
                tap: n.tap.clone(),
                mac: n.mac.clone(),
                netns: n.netns.clone(),
            }),
        }
    }

    /// The spec of a VM in `run_dir` restored from `state`, with the scratch disk in `run_dir`.
    pub(crate) fn spec(&self, run_dir: &Path, state: &Path, detached: bool) -> VmSpec {
        let mut spec = VmSpec::new(&self.kernel, &self.initramfs, run_dir);
        spec.cmdline = KernelCmdline::from_params(self.cmdline.iter().cloned());
        spec.vcpus = self.vcpus;
        spec.memory_mib = self.memory_mib;
        spec.drives = self
            .drives
            .iter()
            .map(|d| match d.serial == SCRATCH_SERIAL {
                true => Drive::new(&d.serial, run_dir.join(SCRATCH_FILE), d.read_only),
                false => Drive::new(&d.serial, &d.path, d.read_only),
            })
            .collect();
        spec.network = self.network.as_ref().map(|n| NetworkInterface {
            tap: n.tap.clone(),
            mac: n.mac.clone(),
            netns: n.netns.clone(),
        });
        spec.detached = detached;
        spec.machine = MachineRevision(self.machine);
        spec.restore_from = Some(state.to_owned());
        // For a state saved whole: a VM descended from a template gets anonymous memory under
        // the template backend's name, so that the state's RAM block and capabilities match (its
        // template need not exist any more). A snapshot that links its template memory maps that
        // instead (`pause/start.rs`).
        spec.memory = match &self.template_memory {
            Some(file) => GuestMemory::Saved(file.clone()),
            None => GuestMemory::Anonymous,
        };
        spec
    }
}

/// Records `spec` in its run directory for a later adopter (a failure only costs that adopter the
/// ability to pause: it is logged).
pub(crate) fn record_spec(run_dir: &Path, spec: &VmSpec) {
    let path = run_dir.join(SPEC_RECORD);
    let json = serde_json::to_vec_pretty(&SpecRecord::of(spec)).expect("spec record serializes");
    if let Err(e) = std::fs::write(&path, json) {
        tracing::warn!(path = %path.display(), "recording the VM's spec: {e}");
    }
}

/// The spec recorded in `run_dir` by [`record_spec`], if any (the run directory is this VM's).
pub(crate) fn read_spec_record(run_dir: &Path) -> Option<VmSpec> {
    let bytes = std::fs::read(run_dir.join(SPEC_RECORD)).ok()?;
    let record: SpecRecord = serde_json::from_slice(&bytes).ok()?;
    let mut spec = record.spec(run_dir, Path::new(""), true);
    spec.restore_from = None;
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_record_rebuilds_the_same_vm_around_a_new_run_directory() {
        let mut spec = VmSpec::new("/k/vmlinux", "/k/init.cpio", "/h/sandboxes/a");
        spec.vcpus = 2;
        spec.memory_mib = 768;
        spec.cmdline.set("hearth.template=1");
        spec.drives = vec![
            Drive::rootfs("/h/rootfs/x.ext4"),
            Drive::scratch("/h/sandboxes/a/scratch.ext4"),
        ];
        spec.network = Some(NetworkInterface {
            tap: "tap0".into(),
            mac: "06:00:ac:10:00:02".into(),
            netns: Some("/h/node/net/a/netns".into()),
        });
        spec.memory = GuestMemory::FromTemplate("/h/templates/t/memory".into());
        spec.machine = MachineRevision::WITH_PIT;
        let json = serde_json::to_string(&SpecRecord::of(&spec)).unwrap();
        let record: SpecRecord = serde_json::from_str(&json).unwrap();
        let again = record.spec(Path::new("/h/sandboxes/a"), Path::new("/p/state"), true);
        let mut expected = spec.clone();
        expected.detached = true;
        expected.restore_from = Some("/p/state".into());
        expected.memory = GuestMemory::Saved("/h/templates/t/memory".into());
        assert_eq!(again, expected);
        // Saved and started again, it records the same.
        assert_eq!(SpecRecord::of(&again), record);
    }

    #[test]
    fn a_record_from_before_file_backed_memory_restores_with_anonymous_memory() {
        let spec = VmSpec::new("/k/vmlinux", "/k/init.cpio", "/h/sandboxes/a");
        let mut json: serde_json::Value = serde_json::to_value(SpecRecord::of(&spec)).unwrap();
        assert!(json.get("template_memory").is_none());
        json.as_object_mut().unwrap().remove("template_memory");
        let record: SpecRecord = serde_json::from_value(json).unwrap();
        let again = record.spec(Path::new("/h/sandboxes/a"), Path::new("/p/state"), true);
        assert_eq!(again.memory, GuestMemory::Anonymous);
    }

    #[test]
    fn a_record_keeps_its_machine_and_one_from_before_revisions_had_the_pit() {
        let spec = VmSpec::new("/k/vmlinux", "/k/init.cpio", "/h/sandboxes/a");
        let mut json: serde_json::Value = serde_json::to_value(SpecRecord::of(&spec)).unwrap();
        assert_eq!(json["machine"], MachineRevision::CURRENT.0);
        let record: SpecRecord = serde_json::from_value(json.clone()).unwrap();
        let again = record.spec(Path::new("/h/sandboxes/a"), Path::new("/p/state"), true);
        assert_eq!(again.machine, MachineRevision::CURRENT);

        json.as_object_mut().unwrap().remove("machine");
        let record: SpecRecord = serde_json::from_value(json).unwrap();
        let again = record.spec(Path::new("/h/sandboxes/a"), Path::new("/p/state"), true);
        assert_eq!(again.machine, MachineRevision::WITH_PIT);
    }
}

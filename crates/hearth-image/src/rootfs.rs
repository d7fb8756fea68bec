//! Turns a staged directory tree into a read-only ext4 image. The `FilesystemImager` trait is the seam
//! to the external tool; `Mkfs` runs `mkfs.ext4 -d` (no journal, lazy inode tables, sized from the
//! staged content) under a timeout. Writes only the output file it is given.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::layer::StagingStats;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot run {program}: {source} (install e2fsprogs)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed building {output} from {staging} ({status}): {stderr}")]
    Failed {
        program: String,
        output: PathBuf,
        staging: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{program} did not finish within {secs} s building {output}; it was killed")]
    Timeout {
        program: String,
        output: PathBuf,
        secs: u64,
    },
}

/// Builds a filesystem image from a directory.
pub trait FilesystemImager: Send + Sync {
    fn build(&self, staging: &Path, stats: &StagingStats, output: &Path)
        -> Result<(), RootfsError>;
}

/// `mkfs.ext4 -d`.
#[derive(Debug, Clone)]
pub struct Mkfs {
    pub program: PathBuf,
    pub timeout: Duration,
}

impl Default for Mkfs {
    fn default() -> Self {
        Mkfs {
            program: PathBuf::from("mkfs.ext4"),
            timeout: Duration::from_secs(600),
        }
    }
}

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// Image size and inode count for the staged content. The image file is sparse, so generous
/// headroom costs metadata only, not disk.
pub fn geometry(stats: &StagingStats) -> (u64, u64) {
    let inodes = stats.entries + 1024;
    let data = stats.file_blocks_bytes + stats.entries * BLOCK;
    let metadata = inodes * INODE_SIZE;
    let raw = data + metadata + (32 << 20);
    let size = (raw + raw / 8).div_ceil(4 << 20) * (4 << 20);
    (size, inodes)
}

impl FilesystemImager for Mkfs {
    fn build(
        &self,
        staging: &Path,
        stats: &StagingStats,
        output: &Path,
    ) -> Result<(), RootfsError> {
        let (size, inodes) = geometry(stats);
        let program = self.program.display().to_string();
        let mut child = Command::new(&self.program)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .args(["-N", &inodes.to_string()])
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-E", "lazy_itable_init=1,nodiscard,root_owner=0:0"])
            .args(["-L", "hearth-rootfs", "-d"])
            .arg(staging)
            .arg(output)
            .arg(format!("{}k", size / 1024))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| RootfsError::Spawn {
                program: program.clone(),
                source,
            })?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RootfsError::Timeout {
                        program,
                        output: output.into(),
                        secs: self.timeout.as_secs(),
                    });
                }
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(source) => return Err(RootfsError::Spawn { program, source }),
            }
        };
        if !status.success() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut stderr);
            }
            return Err(RootfsError::Failed {
                program,
                output: output.into(),
                staging: staging.into(),
                status: status.to_string(),
                stderr: stderr.trim().chars().take(2000).collect(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_leaves_room_for_content_and_inodes() {
        let stats = StagingStats {
            file_blocks_bytes: 100 << 20,
            entries: 5000,
            tar_bytes: 0,
        };
        let (size, inodes) = geometry(&stats);
        assert!(size > (100 << 20) + 5000 * 4096 + inodes * 256);
        assert_eq!(size % (4 << 20), 0);
        assert!(inodes >= 5000);
    }
}

//! The layout of `$HEARTH_HOME` as far as images are concerned: `blobs/sha256/`, `rootfs/`, `tmp/`,
//! `locks/` and the `images.json` index. Creates those directories; touches nothing else.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    pub fn open(root: &Path) -> io::Result<Home> {
        let home = Home {
            root: root.to_path_buf(),
        };
        for dir in [home.rootfs_dir(), home.tmp_dir(), home.locks_dir()] {
            fs::create_dir_all(&dir)?;
        }
        Ok(home)
    }

    pub fn rootfs_dir(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    pub fn rootfs_path(&self, manifest: &Digest) -> PathBuf {
        self.rootfs_dir().join(format!("{}.ext4", manifest.hex()))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// Held shared by every pull, exclusively by garbage collection.
    pub fn store_lock(&self) -> PathBuf {
        self.locks_dir().join("store.lock")
    }

    /// Serialises root filesystem builds of one manifest.
    pub fn build_lock(&self, manifest: &Digest) -> PathBuf {
        self.locks_dir()
            .join(format!("build-{}.lock", manifest.hex()))
    }

    /// Serialises read-modify-write updates of the index.
    pub fn index_lock(&self) -> PathBuf {
        self.locks_dir().join("index.lock")
    }

    pub fn index_path(&self) -> PathBuf {
        self.root.join("images.json")
    }
}

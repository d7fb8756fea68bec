//! A real host tap device for tests that attach a VM's network interface: created with `ip tuntap`
//! (root), brought up, deleted on drop. Its carrier is up exactly while a VMM holds it open.

use std::path::Path;
use std::process::Command;

pub struct Tap {
    pub name: String,
}

impl Tap {
    /// A fresh tap named `<prefix><pid>`; `None` (after saying why) when not root.
    pub fn create(prefix: &str) -> Option<Tap> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            hearth_testkit::skip("creating a tap device needs root");
            return None;
        }
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let _ = ip(&["link", "del", &name]);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]).expect("ip tuntap add");
        ip(&["link", "set", &name, "up"]).expect("ip link set up");
        Some(Tap { name })
    }

    /// Whether a process holds the tap open (its carrier is up).
    pub fn attached(&self) -> bool {
        std::fs::read_to_string(Path::new("/sys/class/net").join(&self.name).join("carrier"))
            .is_ok_and(|c| c.trim() == "1")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

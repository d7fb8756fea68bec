//! Test support for `hearth gateway` end to end: a namespace pair on the test kube-apiserver, a
//! cluster CA, node agents (`hearth serve --kubernetes` with a TLS API and `--advertise-url`),
//! `hearth operator` and `hearth gateway`, each a real process killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::daemon::{hearth, Home};
use super::pki::{Issued, Pki};

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Spawns `cmd` (stdout piped, stderr to `log`) and waits for its `listening on ADDR` line.
pub fn spawn_listening(mut cmd: Command, log: &Path) -> (Proc, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn hearth");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_default();
    let proc = Proc {
        child,
        log: log.to_owned(),
    };
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        panic!("no address printed ({line:?}); log:\n{}", proc.log_text());
    };
    (proc, addr.to_string())
}

/// A port free a moment ago (the node must know its port before it binds, to advertise it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The cluster under test: its namespace, kubeconfig and CA.
pub struct Cluster {
    pub kube: &'static hearth_testkit::Kube,
    /// The namespace of the Sandboxes, node Leases and the operator's lease.
    pub ns: String,
    pub pki: Pki,
    pub gateway_cert: Issued,
    pub dir: PathBuf,
}

impl Cluster {
    /// A node agent with a mutual-TLS API advertised to the gateway (no tokens file).
    pub fn node(&self, home: &Home, name: &str) -> (Proc, String) {
        let port = free_port();
        let cert = self.pki.server(name);
        let endpoint = format!("https://127.0.0.1:{port}");
        let mut cmd = hearth(home);
        cmd.args(["-v", "serve", "--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--accel",
                "tcg",
                "--memory",
                "256m",
                "--capacity-disk",
                "1t",
            ])
            .args(["--capacity-cpus", "2", "--capacity-memory", "2g"])
            .args([
                "--kubernetes",
                "--node-name",
                &format!("{}-{name}", self.ns),
            ])
            .arg("--kubeconfig")
            .arg(&self.kube.kubeconfig)
            .args(["--kube-namespace", &self.ns])
            .args(["--kube-sandbox-namespace", &self.ns])
            .args(["--node-label", &format!("hearth.dev/e2e={}", self.ns)])
            .args(["--node-lease-seconds", "10"])
            .arg("--tls-cert")
            .arg(&cert.cert)
            .arg("--tls-key")
            .arg(&cert.key)
            .arg("--client-ca")
            .arg(self.pki.ca())
            .args(["--advertise-url", &endpoint]);
        let (proc, _) = spawn_listening(cmd, &self.dir.join(format!("node-{name}.log")));
        (proc, endpoint)
    }

    pub fn operator(&self) -> Proc {
        let log = self.dir.join("operator.log");
        let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["-v", "operator", "--kubeconfig"])
            .arg(&self.kube.kubeconfig)
            .args(["--namespace", &self.ns, "--sandbox-namespace", &self.ns])
            .args(["--node-selector", &format!("hearth.dev/e2e={}", self.ns)])
            .args(["--identity", "gw-e2e", "--leader-lease-seconds", "3"])
            .args(["--resync-ms", "300"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn hearth operator");
        Proc { child, log }
    }

    /// `hearth gateway` with `tokens` (TOML); returns it and its `http://` URL.
    pub fn gateway(&self, tokens: &str) -> (Proc, String) {
        let file = self.dir.join("gateway-tokens.toml");
        std::fs::write(&file, tokens).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.env_remove("RUST_LOG")
            .args(["-v", "gateway", "--listen", "127.0.0.1:0", "--tokens"])
            .arg(&file)
            .arg("--kubeconfig")
            .arg(&self.kube.kubeconfig)
            .arg("--node-ca")
            .arg(self.pki.ca())
            .arg("--client-cert")
            .arg(&self.gateway_cert.cert)
            .arg("--client-key")
            .arg(&self.gateway_cert.key);
        let (proc, addr) = spawn_listening(cmd, &self.dir.join("gateway.log"));
        (proc, format!("http://{addr}"))
    }

    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .kube
            .kubectl()
            .expect("kubectl")
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }
}

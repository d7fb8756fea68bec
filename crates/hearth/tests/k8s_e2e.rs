//! Kubernetes end to end: a real kube-apiserver (testkit), `hearth operator` and two node agents
//! (`hearth serve --kubernetes`, each with its own HEARTH_HOME) as processes, real microVMs under TCG.
//! Six Sandboxes of the python test image run to the right exit codes and output tails, spread over both
//! nodes, while the operator is restarted midway (no sandbox boots twice); a running Sandbox is deleted
//! (its VM goes); a node agent is killed (its running Sandbox fails with NodeLost, and its restart stops
//! the leftover VM without running anything again). Eight boots in all.

#[path = "serve/daemon.rs"]
mod daemon;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use daemon::{processes_mentioning, Daemon, Home};
use serde_json::Value;

const TOKEN: &str = "k8s-e2e-token-0001";

fn tokens() -> String {
    format!("[[tenants]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\n")
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    kube: &'static hearth_testkit::Kube,
    ns: String,
}

impl Env {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.kube.kubectl().expect("kubectl");
        cmd.args(["-n", &self.ns]).args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn sandboxes(&self) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.kubectl(&["get", "sandboxes", "-o", "json"], None)).unwrap();
        v["items"].as_array().cloned().unwrap_or_default()
    }

    fn sandbox(&self, name: &str) -> Option<Value> {
        self.sandboxes()
            .into_iter()
            .find(|s| s["metadata"]["name"] == name)
    }

    fn operator(&self, identity: &str, log: &Path) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["-v", "operator", "--kubeconfig"])
            .arg(&self.kube.kubeconfig)
            .args(["--namespace", &self.ns, "--sandbox-namespace", &self.ns])
            .args(["--node-selector", &format!("hearth.dev/e2e={}", self.ns)])
            .args([
                "--identity",
                identity,
                "--leader-lease-seconds",
                "3",
                "--resync-ms",
                "300",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn hearth operator");
        Proc(child)
    }

    fn node(&self, home: &Home, name: &str) -> Daemon {
        let kubeconfig = self.kube.kubeconfig.to_string_lossy().into_owned();
        let e2e_label = format!("hearth.dev/e2e={}", self.ns);
        let name_label = format!("name={name}");
        let node_name = format!("{}-{name}", self.ns);
        Daemon::start(
            home,
            &[
                "--capacity-cpus",
                "2",
                "--capacity-memory",
                "2g",
                "--max-boots",
                "2",
                "--kubernetes",
                "--node-name",
                &node_name,
                "--kubeconfig",
                &kubeconfig,
                "--kube-namespace",
                &self.ns,
                "--kube-sandbox-namespace",
                &self.ns,
                "--node-label",
                &e2e_label,
                "--node-label",
                &name_label,
                "--node-lease-seconds",
                "4",
            ],
        )
    }
}

fn sandbox_yaml(name: &str, image: &str, code: &str, selector: Option<&str>) -> String {
    let selector = selector
        .map(|n| format!("\n  nodeSelector: {{name: {n}}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: hearth.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec:\n  image: {image}\n  \
         command: [python3, -c, {code:?}]\n  resources: {{cpu: 1, memory: 256Mi}}\n  timeoutSeconds: 600{selector}\n---\n"
    )
}

fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn phase(s: &Value) -> &str {
    s["status"]["phase"].as_str().unwrap_or("Pending")
}

fn boots(rt: &tokio::runtime::Runtime, d: &Daemon) -> u64 {
    let text = rt.block_on(async {
        d.request(reqwest::Method::GET, "/metrics", Some(TOKEN))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    text.lines()
        .find_map(|l| l.strip_prefix("hearth_boots_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hearth_boots_total in {text}"))
}

#[test]
fn sandboxes_run_across_two_nodes_survive_operator_restart_and_fail_on_node_loss() {
    let kube = match hearth_testkit::kube() {
        Ok(k) => k,
        Err(e) => return hearth_testkit::skip(&format!("needs a test kube-apiserver: {e:#}")),
    };
    if hearth_testkit::kubectl_bin().is_none() {
        return hearth_testkit::skip("needs kubectl (scripts/provision-kube.sh)");
    }
    let image = hearth_testkit::image_ref("python").expect("test registry");
    let env = Env {
        ns: kube.create_namespace("e2e").unwrap(),
        kube,
    };
    let crds = hearth_testkit::repo_root().join("deploy/crds.yaml");
    env.kubectl(&["apply", "-f", &crds.to_string_lossy()], None);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let (h1, h2) = (Home::new(&tokens()), Home::new(&tokens()));
    let mut n1 = env.node(&h1, "n1");
    let mut n2 = env.node(&h2, "n2");
    let op_log = h1.dir.path().join("operator.log");
    let mut operator = env.operator("op-1", &op_log);

    let mut yaml = String::new();
    for i in 0..6 {
        let code = format!("import sys; print('hello from {i}'); sys.exit({})", i % 3);
        yaml.push_str(&sandbox_yaml(&format!("s{i}"), &image, &code, None));
    }
    env.kubectl(&["apply", "-f", "-"], Some(&yaml));

    // Restart the operator while sandboxes run: nothing may run twice.
    wait("a sandbox Running", Duration::from_secs(180), || {
        env.sandboxes().iter().any(|s| phase(s) == "Running")
    });
    drop(operator);
    operator = env.operator("op-2", &h2.dir.path().join("operator.log"));

    wait("all six finished", Duration::from_secs(400), || {
        env.sandboxes()
            .iter()
            .filter(|s| matches!(phase(s), "Succeeded" | "Failed"))
            .count()
            == 6
    });
    // The finalizer goes once the VM is stopped, just after the result is written.
    wait("finalizers released", Duration::from_secs(60), || {
        env.sandboxes()
            .iter()
            .all(|s| s["metadata"]["finalizers"].is_null())
    });
    let all = env.sandboxes();
    let mut nodes = std::collections::BTreeSet::new();
    for s in &all {
        let name = s["metadata"]["name"].as_str().unwrap();
        let i: i64 = name[1..].parse().unwrap();
        let st = &s["status"];
        assert_eq!(st["exitCode"], i % 3, "{name}: {st}");
        assert_eq!(
            phase(s),
            if i % 3 == 0 { "Succeeded" } else { "Failed" },
            "{name}: {st}"
        );
        assert!(
            st["outputTail"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("hello from {i}")),
            "{name}: {st}"
        );
        assert!(
            st["startTime"].is_string() && st["completionTime"].is_string(),
            "{name}: {st}"
        );
        nodes.insert(st["nodeName"].as_str().unwrap().to_string());
    }
    assert_eq!(nodes.len(), 2, "spread over both nodes: {nodes:?}");
    assert_eq!(
        boots(&rt, &n1) + boots(&rt, &n2),
        6,
        "each sandbox booted exactly once"
    );

    // Deleting a running Sandbox stops its VM before the object goes.
    let sleeper = "import time; print('up', flush=True); time.sleep(600)";
    env.kubectl(
        &["apply", "-f", "-"],
        Some(&sandbox_yaml("doomed", &image, sleeper, Some("n1"))),
    );
    wait("doomed Running", Duration::from_secs(120), || {
        env.sandbox("doomed")
            .is_some_and(|s| phase(&s) == "Running")
    });
    wait("doomed's VM up", Duration::from_secs(60), || {
        !processes_mentioning(&h1.path().to_string_lossy()).is_empty()
    });
    env.kubectl(&["delete", "sandbox", "doomed", "--timeout=60s"], None);
    assert!(env.sandbox("doomed").is_none());
    wait("doomed's VM gone", Duration::from_secs(30), || {
        processes_mentioning(&h1.path().to_string_lossy()).is_empty()
    });

    // A node agent killed while its sandbox runs: NodeLost after the lease expires.
    env.kubectl(
        &["apply", "-f", "-"],
        Some(&sandbox_yaml("stranded", &image, sleeper, Some("n2"))),
    );
    wait("stranded Running", Duration::from_secs(120), || {
        env.sandbox("stranded")
            .is_some_and(|s| phase(&s) == "Running")
    });
    n2.kill9();
    let killed = Instant::now();
    wait("stranded Failed/NodeLost", Duration::from_secs(60), || {
        env.sandbox("stranded")
            .is_some_and(|s| phase(&s) == "Failed" && s["status"]["reason"] == "NodeLost")
    });
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "NodeLost before the lease could expire"
    );
    // Its restart stops the VM the dead agent left and runs nothing again.
    let n2b = env.node(&h2, "n2");
    // Generous: under a loaded CI machine the restarted node first re-attaches the VM (its agent has
    // 10 s to answer) and then stops it.
    let stopped_by = Instant::now() + Duration::from_secs(120);
    while !processes_mentioning(&h2.path().to_string_lossy()).is_empty() {
        if Instant::now() > stopped_by {
            let log = std::fs::read_to_string(&n2b.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "the leftover VM still runs 120 s after the node restarted: {:?}\nnode log:\n{}",
                processes_mentioning(&h2.path().to_string_lossy()),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    wait(
        "stranded's finalizer released",
        Duration::from_secs(30),
        || {
            env.sandbox("stranded")
                .is_some_and(|s| s["metadata"]["finalizers"].is_null())
        },
    );
    assert_eq!(boots(&rt, &n2b), 0, "the restarted agent booted nothing");
    assert_eq!(phase(&env.sandbox("stranded").unwrap()), "Failed");

    drop(operator);
    drop(n2b);
    n1.terminate(Duration::from_secs(10));
}

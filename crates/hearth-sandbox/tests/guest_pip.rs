//! `pip install` in a real guest (QEMU under TCG, the python test image with pip) from the fake
//! internet's package index (hearth-testkit: a PEP 503 index named `pypi.example`), through the
//! sandbox's own resolver and egress proxy, with a policy that allows exactly that name: the
//! package installs and imports. One VM boot.

use std::time::Instant;

use hearth_image::{ImageStore, PullOptions};
use hearth_net::network::{host_addresses, NetworkOptions};
use hearth_net::policy::{Mode, NetworkPolicy};
use hearth_sandbox::{Networking, Sandbox, SandboxConfig};
use hearth_testkit::fake_internet::{FakeInternet, PACKAGE, PACKAGE_GREETING, PACKAGE_MODULE};
use hearth_vm::channel::ExecRequest;

/// The index's name in the fake internet's zone.
const INDEX_NAME: &str = "pypi.example";

/// `argv` in the guest: (stdout and stderr, exit code).
async fn run(sandbox: &Sandbox, argv: &[&str]) -> (String, i32) {
    let out = sandbox
        .client()
        .exec(ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
                "HOME=/root".into(),
            ],
            ..ExecRequest::default()
        })
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let code = out
        .status
        .code
        .unwrap_or(128 + out.status.signal.unwrap_or(0));
    (text, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_installs_from_an_allowed_index_and_the_package_imports() {
    let internet = FakeInternet::start().unwrap();
    let home = tempfile::tempdir().unwrap();
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home.path())
        .unwrap()
        .ensure(&hearth_testkit::image_ref("python").unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home.path());
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    let mut options = NetworkOptions::for_host(Some(internet.dns_server())).unwrap();
    options.host_addrs = host_addresses().unwrap();
    config.network = Some(Networking {
        options,
        home: home.path().to_owned(),
    });
    config.network_policy =
        NetworkPolicy::new(Mode::Allow, vec![INDEX_NAME.parse().unwrap()], vec![]).unwrap();
    let sandbox = Sandbox::create(&config, image).await.unwrap();

    let index_url = format!("http://{INDEX_NAME}/simple/");
    let started = Instant::now();
    let (out, code) = run(
        &sandbox,
        &[
            "python3",
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--retries",
            "0",
            "--timeout",
            "30",
            "--index-url",
            &index_url,
            // Plain HTTP: pip ignores an index that is neither HTTPS nor trusted.
            "--trusted-host",
            INDEX_NAME,
            PACKAGE,
        ],
    )
    .await;
    assert_eq!(
        code,
        0,
        "pip install failed:\n{out}\nnetwork: {:?}",
        sandbox.network_activity()
    );
    eprintln!("pip install took {:?} under TCG", started.elapsed());
    assert!(out.contains("Successfully installed"), "{out}");

    let script = format!("import {PACKAGE_MODULE}; print({PACKAGE_MODULE}.GREETING)");
    let (out, code) = run(&sandbox, &["python3", "-c", &script]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), PACKAGE_GREETING);

    let (stats, _) = sandbox.network_activity().unwrap();
    assert!(stats.proxy.bytes_in > 0, "{stats:?}");
    sandbox.destroy().await.unwrap();
}

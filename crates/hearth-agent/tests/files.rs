//! File requests through the real agent and host client: put/get round trips (streamed, large),
//! stat, list and the errors a caller sees.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use hearth_proto::{ErrorKind, FileKind};
use hearth_vm::channel::ChannelError;

fn agent_error_kind(error: ChannelError) -> ErrorKind {
    match error {
        ChannelError::Agent(e) => e.kind,
        other => panic!("expected an agent error, got {other}"),
    }
}

#[tokio::test]
async fn put_then_get_round_trips_content_mode_and_owner() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let path_str = path.to_str().unwrap();
    // 24 MiB of varied bytes: many windows' worth.
    let content: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let stat = client
        .put_file_owned(path_str, 0o640, 1234, 99, &content[..])
        .await
        .unwrap();
    assert_eq!(
        (stat.kind, stat.size, stat.mode, stat.uid, stat.gid),
        (FileKind::File, content.len() as u64, 0o640, 1234, 99)
    );
    let on_disk = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (on_disk.mode() & 0o7777, on_disk.uid(), on_disk.gid()),
        (0o640, 1234, 99)
    );
    assert_eq!(std::fs::read(&path).unwrap(), content);

    let download = client.get_file(path_str).await.unwrap();
    assert_eq!(
        (download.mode(), download.size()),
        (0o640, content.len() as u64)
    );
    assert_eq!(download.bytes(usize::MAX).await.unwrap(), content);

    // Replacing is atomic and leaves no temporary files behind.
    client
        .put_file(path_str, 0o644, &b"small"[..])
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"small");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["data.bin"]);

    let mut copy = Vec::new();
    let copied = client
        .get_file(path_str)
        .await
        .unwrap()
        .copy_to(&mut copy)
        .await
        .unwrap();
    assert_eq!((copied, copy.as_slice()), (5, &b"small"[..]));
    let limited = client.get_file(path_str).await.unwrap().bytes(3).await;
    assert!(limited.is_err());
}

#[tokio::test]
async fn stat_and_list_describe_the_tree() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "abc").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("file", dir.path().join("link")).unwrap();
    let base = dir.path().to_str().unwrap();

    let listing = client.list(base).await.unwrap();
    let names: Vec<_> = listing
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.stat.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("file", FileKind::File),
            ("link", FileKind::Symlink),
            ("sub", FileKind::Dir)
        ]
    );
    let link = client.stat(&format!("{base}/link")).await.unwrap();
    assert_eq!(
        (link.kind, link.link_target.as_deref()),
        (FileKind::Symlink, Some("file"))
    );
    assert_eq!(client.stat(&format!("{base}/file")).await.unwrap().size, 3);
}

#[tokio::test]
async fn errors_carry_a_kind_and_the_path() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap();
    let missing = format!("{base}/missing/file");

    let err = client.stat(&missing).await.unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
    assert_eq!(agent_error_kind(err), ErrorKind::NotFound);
    assert_eq!(
        agent_error_kind(client.get_file(&missing).await.err().unwrap()),
        ErrorKind::NotFound
    );
    assert_eq!(
        agent_error_kind(client.get_file(base).await.err().unwrap()),
        ErrorKind::IsADirectory
    );
    assert_eq!(
        agent_error_kind(client.list(&missing).await.unwrap_err()),
        ErrorKind::NotFound
    );
    // A put into a missing directory is refused even though the upload is larger than a window.
    let big = vec![1u8; 8 * 1024 * 1024];
    assert_eq!(
        agent_error_kind(
            client
                .put_file(&missing, 0o644, &big[..])
                .await
                .unwrap_err()
        ),
        ErrorKind::NotFound
    );
    assert_eq!(
        agent_error_kind(client.stat("relative/path").await.unwrap_err()),
        ErrorKind::InvalidRequest
    );
    // The channel still works after all those failures.
    assert!(client.info().await.is_ok());
}

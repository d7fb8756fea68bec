"""The synchronous SDK against the real daemon: exec (argv, shell strings, env, cwd, stdin,
timeouts, streaming), background execs, files, network, ports, feature detection and errors, all
on the session's one sandbox."""

from __future__ import annotations

import hashlib
import time

import pytest

import hearth


def test_create_answers_a_running_sandbox_listed_and_connectable(sandbox: hearth.Sandbox) -> None:
    assert sandbox.info.state == "running"
    assert sandbox.info.labels == {"suite": "sdk"}
    assert sandbox.id in [s.id for s in hearth.Sandbox.list()]
    other = hearth.Sandbox.connect(sandbox.id)
    try:
        assert other.info.image == sandbox.info.image
        assert other.exec(["true"]).exit_code == 0
    finally:
        other.close()


def test_exec_argv_and_shell_strings(sandbox: hearth.Sandbox) -> None:
    r = sandbox.exec(["echo", "a b", "$GREETING"])
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (0, "a b $GREETING\n", "", True)
    r = sandbox.exec("echo $GREETING; echo oops >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "hello\n", "oops\n", False)
    assert r.signal is None and not r.timed_out


def test_exec_env_cwd_user_and_stdin(sandbox: hearth.Sandbox) -> None:
    r = sandbox.exec("echo $GREETING $EXTRA; pwd; id -u", env={"EXTRA": "there"}, cwd="/tmp",
                     user="nobody")
    assert r.exit_code == 0, r
    greeting, cwd, uid = r.stdout.splitlines()
    assert (greeting, cwd) == ("hello there", "/tmp")
    assert uid != "0"
    data = bytes(range(256)) * 64
    r = sandbox.exec(["cat"], stdin=data)
    assert r.stdout_bytes == data
    assert sandbox.exec("wc -c", stdin="four").stdout.strip() == "4"


def test_exec_takes_stdin_larger_than_the_json_body_limit(sandbox: hearth.Sandbox) -> None:
    """Over 4 MiB, stdin goes over the exec WebSocket (inline base64 would pass the daemon's
    8 MiB JSON limit)."""
    data = bytes(range(256)) * (24 << 10)
    r = sandbox.exec("md5sum", stdin=data)
    assert r.exit_code == 0, r
    assert r.stdout.split()[0] == hashlib.md5(data).hexdigest()


def test_exec_timeout_kills_the_command(sandbox: hearth.Sandbox) -> None:
    started = time.monotonic()
    r = sandbox.exec(["sleep", "60"], timeout=1)
    assert r.timed_out and r.signal is not None and r.exit_code is None, r
    assert time.monotonic() - started < 30


def test_exec_streams_output_as_it_is_produced(sandbox: hearth.Sandbox) -> None:
    seen: list[tuple[float, str, str]] = []
    r = sandbox.exec(
        "echo first; echo warn >&2; sleep 2; echo second",
        on_stdout=lambda text: seen.append((time.monotonic(), "out", text)),
        on_stderr=lambda text: seen.append((time.monotonic(), "err", text)),
    )
    assert r.stdout == "first\nsecond\n" and r.stderr == "warn\n"
    out = [(t, text) for t, kind, text in seen if kind == "out"]
    assert "".join(text for _, text in out) == "first\nsecond\n"
    assert [text for _, kind, text in seen if kind == "err"] == ["warn\n"]
    # "first" reached the callback while the command still slept, not with the exit.
    assert out[-1][0] - out[0][0] > 1.0, seen


def test_background_exec_takes_stdin_and_ends(sandbox: hearth.Sandbox) -> None:
    chunks: list[str] = []
    with sandbox.exec(["sh", "-c", "while read line; do echo got $line; done; echo eof"],
                      background=True, on_stdout=chunks.append) as handle:
        handle.send_stdin("one\n")
        handle.send_stdin(b"two\n")
        handle.close_stdin()
        r = handle.wait(timeout=60)
    assert r.exit_code == 0
    assert r.stdout == "got one\ngot two\neof\n" == "".join(chunks)
    assert handle.done


def test_background_exec_wait_times_out_and_kill_stops_it(sandbox: hearth.Sandbox) -> None:
    handle = sandbox.exec("echo started; exec sleep 600", background=True)
    with pytest.raises(TimeoutError):
        handle.wait(timeout=1)
    assert not handle.done
    handle.kill()
    r = handle.wait(timeout=60)
    assert r.signal == 9 and r.exit_code is None and r.stdout == "started\n", r
    with pytest.raises(hearth.ExecFailed):
        handle.send_stdin("too late")


def test_background_exec_takes_stdin_larger_than_one_message(sandbox: hearth.Sandbox) -> None:
    data = b"x" * (3 << 20)
    handle = sandbox.exec("wc -c", background=True, stdin=data)
    handle.close_stdin()
    assert handle.wait(timeout=120).stdout.strip() == str(len(data))


def test_files_round_trip_list_and_remove(sandbox: hearth.Sandbox) -> None:
    data = bytes(range(256)) * 100
    sandbox.exec("mkdir -p /tmp/sdk")
    assert sandbox.files.write("/tmp/sdk/blob.bin", data) == len(data)
    assert sandbox.files.read("/tmp/sdk/blob.bin") == data
    sandbox.files.write("/tmp/sdk/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sandbox.exec(["/tmp/sdk/run.sh"]).stdout == "ran\n"
    assert sandbox.files.read_text("/tmp/sdk/run.sh").startswith("#!/bin/sh")
    entries = {e.name: e for e in sandbox.files.list("/tmp/sdk")}
    assert entries["blob.bin"].kind == "file" and entries["blob.bin"].size == len(data)
    assert entries["run.sh"].mode & 0o777 == 0o755
    with pytest.raises(hearth.InvalidRequest):
        sandbox.files.read("/tmp/sdk")
    with pytest.raises(hearth.InvalidRequest):
        sandbox.files.list("/tmp/sdk/run.sh")
    sandbox.files.remove("/tmp/sdk/blob.bin")
    with pytest.raises(hearth.NotFound):
        sandbox.files.read("/tmp/sdk/blob.bin")
    with pytest.raises(hearth.NotFound):
        sandbox.files.remove("/tmp/sdk/blob.bin")
    with pytest.raises(hearth.InvalidRequest):
        sandbox.files.remove("/tmp/sdk")
    sandbox.files.remove("/tmp/sdk", recursive=True)
    assert sandbox.exec("test -e /tmp/sdk").exit_code == 1


def test_files_writes_into_a_missing_directory_fail_with_not_found(sandbox: hearth.Sandbox) -> None:
    with pytest.raises(hearth.NotFound):
        sandbox.files.write("/no/such/dir/file", "x")


def test_network_policy_is_read_and_replaced(sandbox: hearth.Sandbox) -> None:
    assert sandbox.network.get().policy["mode"] == "none"
    view = sandbox.network.set("allow", allow=["example.com"])
    assert view.policy["mode"] == "allow" and view.policy["allow"] == ["example.com"]
    assert sandbox.network.get().policy["allow"] == ["example.com"]
    with pytest.raises(hearth.InvalidRequest):
        sandbox.network.set("sideways")
    sandbox.network.set({"mode": "none"})
    assert sandbox.network.get().policy["mode"] == "none"


def test_ports_reach_a_server_in_the_sandbox(sandbox: hearth.Sandbox) -> None:
    sandbox.exec("mkdir -p /tmp/www && printf hello-from-guest > /tmp/www/index.html")
    with sandbox.exec(["httpd", "-f", "-p", "8000", "-h", "/tmp/www"], background=True):
        deadline = time.monotonic() + 30
        while True:
            try:
                r = sandbox.ports.request(8000, "GET", "/index.html")
                break
            except hearth.PortClosed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert (r.status_code, r.text) == (200, "hello-from-guest")
        # The guest's own 404 comes back as an answer, not as hearth.NotFound.
        assert sandbox.ports.request(8000, "GET", "/missing").status_code == 404
        assert sandbox.ports.url(8000, "/a").endswith(f"/v1/sandboxes/{sandbox.id}/ports/8000/a")
    with pytest.raises(hearth.PortClosed):
        sandbox.ports.request(8001)


def test_pause_resume_and_fork_are_detected(sandbox: hearth.Sandbox) -> None:
    """The daemon's /openapi.json says which exist: the others raise Unsupported, naming them."""
    features = sandbox._client.features()
    from hearth._features import FORK, PAUSE, RESUME

    if features.has(PAUSE) and features.has(RESUME):
        sandbox.pause()
        sandbox.resume()
        assert sandbox.exec("echo back").stdout == "back\n"
    else:
        with pytest.raises(hearth.Unsupported, match="pause"):
            sandbox.pause()
    if features.has(FORK):
        sandbox.files.write("/tmp/before-fork", "parent")
        (child,) = sandbox.fork(1)
        try:
            assert child.id != sandbox.id
            assert child.files.read("/tmp/before-fork") == b"parent"
        finally:
            child.delete()
    else:
        with pytest.raises(hearth.Unsupported, match="fork"):
            sandbox.fork(1)


def test_errors_are_typed(sandbox: hearth.Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(hearth.Unauthorized):
        hearth.Sandbox.list(token="not-a-token")
    with pytest.raises(hearth.Unauthorized):
        hearth.Sandbox.connect(sandbox.id, token="not-a-token")
    with pytest.raises(hearth.NotFound):
        hearth.Sandbox.connect("0000000000000000")
    # The daemon has 4 vCPUs: refused at once, with the daemon's Retry-After.
    with pytest.raises(hearth.CapacityExhausted) as refused:
        hearth.Sandbox.create(sandbox.info.image, cpus=5)
    assert refused.value.retry_after is not None and refused.value.retry_after > 0
    assert (refused.value.status, refused.value.code) == (503, "capacity")
    with pytest.raises(hearth.InvalidRequest, match="memory"):
        hearth.Sandbox.create(sandbox.info.image, memory="lots")
    with pytest.raises(hearth.InvalidRequest):
        sandbox.exec([])
    with pytest.raises(hearth.ConnectionFailed):
        hearth.Sandbox.list(host="http://127.0.0.1:9")
    monkeypatch.delenv("HEARTH_TOKEN")
    with pytest.raises(hearth.Unauthorized, match="HEARTH_TOKEN"):
        hearth.Sandbox.list()

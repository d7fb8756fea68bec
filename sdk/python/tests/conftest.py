"""Fixtures for the SDK's tests, which run against a real ``hearth serve`` with real VMs (started
by ``crates/hearth/tests/sdk_python.rs``). The environment names the daemon (``HEARTH_HOST``,
``HEARTH_TOKEN``), the image (``HEARTH_TEST_IMAGE``, a busybox) and a second tenant's token whose
quota is one sandbox (``HEARTH_TEST_QUOTA_TOKEN``). Boots are slow under TCG, so one sandbox,
shared by the whole session, carries most checks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import hearth


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set: run these tests through `cargo nextest run -p hearth --test "
            "sdk_python`, which starts a daemon and sets it"
        )
    return value


@pytest.fixture(scope="session")
def image() -> str:
    return _env("HEARTH_TEST_IMAGE")


@pytest.fixture(scope="session")
def quota_token() -> str:
    return _env("HEARTH_TEST_QUOTA_TOKEN")


@pytest.fixture(scope="session")
def sandbox(image: str) -> Iterator[hearth.Sandbox]:
    _env("HEARTH_HOST")
    _env("HEARTH_TOKEN")
    with hearth.Sandbox.create(image, env={"GREETING": "hello"}, labels={"suite": "sdk"},
                               ttl=1800) as sb:
        yield sb

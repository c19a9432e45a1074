"""The manager the tests run against: `ARL_URL` (and `ARL_AUTH_TOKEN`), which `cargo test`
sets when it runs these tests against a manager it started (tests/tests/python_client.rs)."""

import os

import pytest


@pytest.fixture(scope="session")
def url() -> str:
    value = os.environ.get("ARL_URL")
    if not value:
        pytest.fail("set ARL_URL to a running arl-manager (cargo test starts one and sets it)")
    return value


@pytest.fixture(scope="session")
def token() -> str | None:
    return os.environ.get("ARL_AUTH_TOKEN") or None

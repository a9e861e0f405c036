"""etcd over TLS with a CA made by the test, and with user auth (SPEC 11)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.etcd_fixtures import (OPENSSL, EtcdCluster, FleetFactory, TLSFiles, make_tls,
                                 needs_etcd, serve)
from tests.support import HOST, Backend, connect, run_cli

pytestmark = needs_etcd


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend("name", name="a")
    yield server
    server.close()


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    return make_tls(tmp_path / "tls")


def test_tls_with_a_client_certificate(tmp_path: Path, tls: TLSFiles, fleet: FleetFactory,
                                       backend: Backend) -> None:
    etcd = EtcdCluster(tmp_path / "etcd", tls=tls).start()
    try:
        assert etcd.endpoints.startswith("https://")
        options = ("--etcd-cacert", str(tls.ca), "--etcd-cert", str(tls.client_cert),
                   "--etcd-key", str(tls.client_key))
        proxy, (port,) = serve(etcd, fleet, lambda ports: [
            {"Name": "web", "Ports": ports, "Targets": [f"{HOST}:{backend.port}"]}], 1,
            *options)
        with connect(port) as sock:
            assert sock.recv(64).startswith(b"a")
        assert proxy.metric("rawproxy_etcd_connected") == 1
        # Without the CA the member's certificate is not trusted: a clear line.
        unverified = run_cli("--etcd", etcd.endpoints, "--etcd-timeout", "0.5", "--check")
        assert unverified.returncode == 1
        assert "TLS: unable to get local issuer certificate" in unverified.stderr
        assert unverified.stderr.count("\n") == 1
    finally:
        etcd.close()


def test_auth_with_a_user_and_a_wrong_password(tmp_path: Path, fleet: FleetFactory,
                                               backend: Backend) -> None:
    etcd = EtcdCluster(tmp_path / "etcd").start()
    try:
        etcd.put_config([{"Name": "web", "Ports": [1], "Targets": []}])
        etcd.enable_auth("root", "s3cret")
        good = tmp_path / "password"
        good.write_text("s3cret\n")
        result = run_cli("--etcd", etcd.endpoints, "--etcd-user", "root",
                         "--etcd-password-file", str(good), "--check")
        assert result.returncode == 0, result.stderr
        bad = tmp_path / "wrong"
        bad.write_text("guess")
        result = run_cli("--etcd", etcd.endpoints, "--etcd-user", "root",
                         "--etcd-password-file", str(bad), "--check")
        assert (result.returncode, result.stderr) == (
            2, f"rawproxy: error: etcd: {etcd.endpoints}: etcdserver: authentication "
               "failed, invalid user ID or password\n")
        anonymous = run_cli("--etcd", etcd.endpoints, "--check")
        assert anonymous.returncode == 2 and "user name is empty" in anonymous.stderr
    finally:
        etcd.close()

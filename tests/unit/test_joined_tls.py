"""A host joins with the Temporal TLS settings it was given; its config keeps them so its worker
connects alike, from whatever directory it is started in."""

import os
from pathlib import Path

from hms_mgmt.cli.node_cmd import joined_tls
from hms_mgmt.config import Settings


def test_certificate_paths_are_kept_absolute_and_unset_ones_are_left_out(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = Settings(state_dir=tmp_path / "s", tls_ca="pki/ca.pem", tls_cert="pki/node.pem", tls_key="pki/node.key")
    kept = joined_tls(given)
    assert kept["tls_ca"] == str(tmp_path / "pki" / "ca.pem") and os.path.isabs(kept["tls_key"])
    assert "api_key" not in kept and "tls_server_name" not in kept

"""The Temporal connection's TLS settings: what each combination dials with, and every half-done
or contradictory one refused before dialling, naming the setting (hms_mgmt.config.temporal_tls)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from temporalio.client import TLSConfig

from hms_mgmt.config import Settings, connect, describe_temporal_tls, temporal_tls
from hms_mgmt.errors import ConfigError
from hms_mgmt.testing import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"HMS_STATE_DIR": str(tmp_path / "state"), **env})


def test_nothing_set_is_plaintext(tmp_path: Path) -> None:
    assert temporal_tls(settings(tmp_path)) is False


def test_ca_only_is_server_tls(tmp_path: Path, pki: Pki) -> None:
    tls = temporal_tls(settings(tmp_path, HMS_TEMPORAL_TLS_CA=str(pki.ca)))
    assert isinstance(tls, TLSConfig)
    assert tls.server_root_ca_cert == pki.ca.read_bytes() and tls.client_cert is None and tls.domain is None


def test_mtls_with_a_server_name(tmp_path: Path, pki: Pki) -> None:
    s = settings(tmp_path, HMS_TEMPORAL_TLS_CERT=str(pki.client_cert), HMS_TEMPORAL_TLS_KEY=str(pki.client_key),
                 HMS_TEMPORAL_TLS_CA=str(pki.ca), HMS_TEMPORAL_TLS_SERVER_NAME="temporal.test")
    tls = temporal_tls(s)
    assert isinstance(tls, TLSConfig)
    assert tls.client_cert == pki.client_cert.read_bytes() and tls.client_private_key == pki.client_key.read_bytes()
    assert tls.domain == "temporal.test"
    assert describe_temporal_tls(s) == (f"TLS, server verified against {pki.ca} as temporal.test, "
                                        f"client certificate {pki.client_cert}")


def test_a_client_certificate_without_a_ca_uses_the_system_roots(tmp_path: Path, pki: Pki) -> None:
    tls = temporal_tls(settings(tmp_path, HMS_TEMPORAL_TLS_CERT=str(pki.client_cert),
                                HMS_TEMPORAL_TLS_KEY=str(pki.client_key)))
    assert isinstance(tls, TLSConfig) and tls.server_root_ca_cert is None and tls.client_cert


def test_an_api_key_turns_tls_on_with_the_system_roots(tmp_path: Path) -> None:
    s = settings(tmp_path, HMS_TEMPORAL_API_KEY="key")
    tls = temporal_tls(s)
    assert isinstance(tls, TLSConfig) and tls.server_root_ca_cert is None
    assert describe_temporal_tls(s) == "TLS, server verified against the system CAs, API key"


def test_an_api_key_with_a_private_ca(tmp_path: Path, pki: Pki) -> None:
    tls = temporal_tls(settings(tmp_path, HMS_TEMPORAL_API_KEY="key", HMS_TEMPORAL_TLS_CA=str(pki.ca)))
    assert isinstance(tls, TLSConfig) and tls.server_root_ca_cert == pki.ca.read_bytes()


def test_an_api_key_in_plaintext_only_when_asked_for(tmp_path: Path) -> None:
    s = settings(tmp_path, HMS_TEMPORAL_API_KEY="key", HMS_TEMPORAL_TLS="false")
    assert temporal_tls(s) is False
    assert describe_temporal_tls(s) == "plaintext, API key"


def test_tls_on_with_the_system_roots(tmp_path: Path) -> None:
    tls = temporal_tls(settings(tmp_path, HMS_TEMPORAL_TLS="true", HMS_TEMPORAL_TLS_SERVER_NAME="temporal.example"))
    assert isinstance(tls, TLSConfig) and tls.server_root_ca_cert is None and tls.domain == "temporal.example"


def test_the_config_file_holds_the_same_settings(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "config.yaml").write_text(f"tls_ca: {pki.ca}\ntls_server_name: temporal.test\n")
    tls = temporal_tls(settings(tmp_path))
    assert isinstance(tls, TLSConfig) and tls.domain == "temporal.test"
    (tmp_path / "state" / "config.yaml").write_text("temporal_tls: false\napi_key: k\n")
    assert temporal_tls(settings(tmp_path)) is False


def _encrypted_key(pki: Pki, path: Path) -> Path:
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    return path


# (environment, words the error must hold); "{x}" are the pki's paths, "{tmp}" the test's directory.
REFUSED = {
    "cert without key": ({"HMS_TEMPORAL_TLS_CERT": "{client_cert}"},
                         ["HMS_TEMPORAL_TLS_CERT is set but HMS_TEMPORAL_TLS_KEY is not"]),
    "key without cert": ({"HMS_TEMPORAL_TLS_KEY": "{client_key}", "HMS_TEMPORAL_TLS_CA": "{ca}"},
                         ["HMS_TEMPORAL_TLS_KEY is set but HMS_TEMPORAL_TLS_CERT is not"]),
    "missing CA": ({"HMS_TEMPORAL_TLS_CA": "{tmp}/nowhere.pem"},
                   ["HMS_TEMPORAL_TLS_CA", "nowhere.pem", "No such file"]),
    "CA is a directory": ({"HMS_TEMPORAL_TLS_CA": "{tmp}"}, ["HMS_TEMPORAL_TLS_CA", "cannot read"]),
    "missing key": ({"HMS_TEMPORAL_TLS_CERT": "{client_cert}", "HMS_TEMPORAL_TLS_KEY": "{tmp}/gone.key"},
                    ["HMS_TEMPORAL_TLS_KEY", "gone.key", "No such file"]),
    "CA not PEM": ({"HMS_TEMPORAL_TLS_CA": "{tmp}/garbage"}, ["HMS_TEMPORAL_TLS_CA", "no PEM certificate"]),
    "key given as cert": ({"HMS_TEMPORAL_TLS_CERT": "{client_key}", "HMS_TEMPORAL_TLS_KEY": "{client_key}"},
                          ["HMS_TEMPORAL_TLS_CERT", "no PEM certificate"]),
    "cert given as key": ({"HMS_TEMPORAL_TLS_CERT": "{client_cert}", "HMS_TEMPORAL_TLS_KEY": "{client_cert}"},
                          ["HMS_TEMPORAL_TLS_KEY", "no PEM private key"]),
    "key of another cert": ({"HMS_TEMPORAL_TLS_CERT": "{client_cert}", "HMS_TEMPORAL_TLS_KEY": "{ca_key}"},
                            ["HMS_TEMPORAL_TLS_KEY", "is not the key of the certificate in HMS_TEMPORAL_TLS_CERT"]),
    "encrypted key": ({"HMS_TEMPORAL_TLS_CERT": "{client_cert}", "HMS_TEMPORAL_TLS_KEY": "{tmp}/encrypted.key"},
                      ["HMS_TEMPORAL_TLS_KEY", "encrypted"]),
    "server name without TLS": ({"HMS_TEMPORAL_TLS_SERVER_NAME": "temporal.test"},
                                ["HMS_TEMPORAL_TLS_SERVER_NAME is set but TLS is not on"]),
    "server name with a port": ({"HMS_TEMPORAL_TLS_CA": "{ca}", "HMS_TEMPORAL_TLS_SERVER_NAME": "temporal.test:7233"},
                                ["HMS_TEMPORAL_TLS_SERVER_NAME", "not a host name"]),
    "TLS off with a CA": ({"HMS_TEMPORAL_TLS": "false", "HMS_TEMPORAL_TLS_CA": "{ca}"},
                          ["HMS_TEMPORAL_TLS is false but HMS_TEMPORAL_TLS_CA is set"]),
    "TLS off with a client cert": ({"HMS_TEMPORAL_TLS": "0", "HMS_TEMPORAL_TLS_CERT": "{client_cert}",
                                    "HMS_TEMPORAL_TLS_KEY": "{client_key}"},
                                   ["HMS_TEMPORAL_TLS_CERT and HMS_TEMPORAL_TLS_KEY are set"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_half_done_settings_are_refused_before_dialling(case: str, tmp_path: Path, pki: Pki) -> None:
    env, words = REFUSED[case]
    (tmp_path / "garbage").write_text("not a certificate\n")
    _encrypted_key(pki, tmp_path / "encrypted.key")
    paths = {"tmp": str(tmp_path), "ca": str(pki.ca), "ca_key": str(pki.ca_key),
             "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    # Port 1 answers nothing: an error here comes from the settings, not from a dial.
    s = settings(tmp_path, HMS_TEMPORAL_ADDRESS="127.0.0.1:1",
                 **{k: v.format(**paths) for k, v in env.items()})
    with pytest.raises(ConfigError) as refused:
        await connect(s)
    for w in words:
        assert w in str(refused.value)


def test_an_expired_client_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(1)  # type: ignore[union-attr]
            .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="HMS_TEMPORAL_TLS_CERT: the certificate in .*old.pem expired"):
        temporal_tls(settings(tmp_path, HMS_TEMPORAL_TLS_CERT=str(tmp_path / "old.pem"),
                              HMS_TEMPORAL_TLS_KEY=str(pki.client_key)))

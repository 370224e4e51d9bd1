"""WinRmSettings: the refused combinations, the defaults, and the pywinrm transport each choice selects.

Protocols are constructed and inspected, never connected.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import SecretStr

from vmrepl.errors import ConfigError, HostTrustError, InvalidArgument
from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv.winrm import HostClient, WinRmSettings, encode_params

SECRET = "pa$$ 'word' \"x\""


def settings(**kw: Any) -> WinRmSettings:
    base: dict[str, Any] = {"address": "hv01.example.com", "username": "LAB\\replicator", "password": SecretStr(SECRET)}
    return WinRmSettings(**(base | kw))


def test_defaults_are_https_5986_ntlm_validated_600_s() -> None:
    s = settings()
    assert (s.scheme, s.port, s.auth, s.script_timeout_seconds) == ("https", 5986, "ntlm", 600)
    assert s.endpoint == "https://hv01.example.com:5986/wsman"
    # The API's unset values (empty strings, zeros) mean the same defaults.
    assert settings(scheme="", auth="", port=0, script_timeout_seconds=0) == s
    assert settings(scheme="http").port == 5985
    assert settings(address="fd00::5", port=15986).endpoint == "https://[fd00::5]:15986/wsman"


def test_password_is_never_in_the_repr() -> None:
    s = settings()
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert s.protocol_arguments()["password"] == SECRET


@pytest.mark.parametrize(
    ("kw", "field", "words"),
    [
        ({"scheme": "http", "auth": "basic"}, "winrm.auth", "only over https"),
        ({"scheme": "http", "auth": "credssp"}, "winrm.auth", "only over https"),
        ({"scheme": "http", "ca_bundle": "/etc/ca.pem"}, "winrm.ca_bundle", "https only"),
        ({"scheme": "ftp"}, "winrm.scheme", "not https or http"),
        ({"auth": "digest"}, "winrm.auth", "not ntlm"),
        ({"port": 70000}, "winrm.port", "not a TCP port"),
        ({"script_timeout_seconds": -1}, "winrm.script_timeout_seconds", "between"),
        ({"operation_timeout_seconds": 30, "read_timeout_seconds": 30}, "winrm.read_timeout_seconds", "exceed"),
        ({"username": ""}, "winrm.username", "required"),
        ({"address": "https://hv01/wsman"}, "address", "not a host name"),
        ({"address": ""}, "address", "required"),
    ],
)
def test_refused_combinations(kw: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        settings(**kw)
    assert raised.value.field == field and words in raised.value.description
    assert SECRET not in str(raised.value)


def test_https_validates_against_the_ca_bundle_without_message_encryption(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    p = settings(auth="basic", ca_bundle=str(ca)).protocol()
    t = p.transport
    assert (t.auth_method, t.server_cert_validation, t.ca_trust_path) == ("basic", "validate", str(ca))
    assert t.message_encryption == "never" and t.proxy is None  # TLS protects the messages
    assert p.read_timeout_sec == 30 and p.operation_timeout_sec == 20


def test_http_ntlm_always_encrypts_messages() -> None:
    t = settings(scheme="http", auth="ntlm").protocol().transport
    assert (t.endpoint, t.auth_method, t.message_encryption) == ("http://hv01.example.com:5985/wsman", "ntlm", "always")
    assert (t.username, t.password) == ("LAB\\replicator", SECRET)


def test_kerberos_selects_pywinrm_kerberos_without_a_password() -> None:
    for scheme, encryption in (("https", "never"), ("http", "always")):
        p = settings(scheme=scheme, auth="kerberos").protocol()
        t = p.transport
        assert (t.auth_method, t.message_encryption, t.service) == ("kerberos", encryption, "HTTP")
        # The controller's ticket for the principal authenticates; the stored password is not sent anywhere.
        assert (t.username, t.password) == ("LAB\\replicator", None)
        assert t.kerberos_delegation is False and t.send_cbt is True


def test_credssp_selects_pywinrm_credssp_over_https_only() -> None:
    t = settings(auth="credssp").protocol().transport
    assert (t.auth_method, t.message_encryption, t.password) == ("credssp", "never", SECRET)
    assert t.credssp_disable_tlsv1_2 is False
    with pytest.raises(InvalidArgument):
        settings(scheme="http", auth="credssp")


def test_ca_bundle_that_is_not_a_file_is_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"winrm\.ca_bundle"):
        settings(ca_bundle=str(tmp_path / "missing.pem")).protocol()


def test_params_travel_as_base64_of_utf8_json() -> None:
    params = m.VmParams(vm="测试 \"q\" 'x' $(evil)")
    encoded = encode_params(params)
    assert encoded.isascii()
    assert json.loads(base64.b64decode(encoded).decode("utf-8")) == {"vm": params.vm}


def _cert_error(text: str) -> Exception:
    import ssl

    import requests

    return requests.exceptions.SSLError(ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {text}"))


def test_a_certificate_for_another_name_says_to_use_the_name_not_a_ca_bundle() -> None:
    client = HostClient(settings(ca_bundle="/etc/vmrepl/hv-ca.pem"))
    mismatch = client._transport_error(
        _cert_error("certificate verify failed: Hostname mismatch, certificate is not valid for 'hv01'.")
    )
    assert isinstance(mismatch, HostTrustError)
    assert "not issued for" in str(mismatch) and "--address" in str(mismatch) and "ca-bundle" not in str(mismatch)
    unknown = client._transport_error(_cert_error("certificate verify failed: unable to get local issuer certificate"))
    assert isinstance(unknown, HostTrustError)
    assert "not trusted by the CA bundle /etc/vmrepl/hv-ca.pem" in str(unknown) and "--winrm-ca-bundle" in str(unknown)

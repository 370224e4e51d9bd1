"""The API's validation and conversions that need no database: webhook URLs, page tokens, paths."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from controller import resources as res
from controller.db.secrets import SecretBox
from protos.vmrepl.v1 import controller_pb2 as api
from vmrepl.errors import InvalidArgument

HOOK_URL = "https://hookuser:hook-pw-1d7c@hooks.example:8443/notify/T0K-path?token=tok-q-5e2a"


def test_redacted_webhook_urls_show_scheme_host_and_port_only() -> None:
    cases = {
        HOOK_URL: "https://hooks.example:8443/…",
        "http://user@[::1]:81": "http://[::1]:81/…",
        "https://hooks.example": "https://hooks.example",
        "https://hooks.example/": "https://hooks.example",
        "https://hooks.example/?k=v": "https://hooks.example/…",
        "https://hooks.example#frag": "https://hooks.example/…",
        "https://h:99999/": "(unreadable URL)",
    }
    for url, shown in cases.items():
        assert res.redact_url(url) == shown, url


def test_a_webhook_is_stored_sealed_and_a_shown_url_sent_back_keeps_it() -> None:
    box = SecretBox([Fernet.generate_key()])
    stored = res._webhook(api.Webhook(url=HOOK_URL), box, current=None)
    assert box.open(stored["sealed_url"].encode()) == HOOK_URL and "tok-q" not in str(stored)
    again = res._webhook(api.Webhook(url=stored["shown_url"], failures_only=True), box, current=stored)
    assert again == {**stored, "failures_only": True}
    other = res._webhook(api.Webhook(url="http://other.example/x"), box, current=stored)
    assert box.open(other["sealed_url"].encode()) == "http://other.example/x"
    assert res._webhook(api.Webhook(), box, current=stored) == {}
    for bad in ("ftp://h/x", "https://h:99999/", "https://h/\x00", "http:///nohost", "https://h/" + "x" * 2048):
        with pytest.raises(InvalidArgument, match=r"^job\.webhook\.url:"):
            res._webhook(api.Webhook(url=bad), box, current=None)

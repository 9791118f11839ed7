"""``redact_url``: secrets out, everything else an operator needs kept."""

from __future__ import annotations

import pytest

from gateway.redact import redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:S3cret@db:6379/0", "redis://:***@db:6379/0"),
    ("redis://app:S3cret@db:6379/0", "redis://app:***@db:6379/0"),
    ("rediss://app:p%40ss%3Aw0rd@db.example:6380/2", "rediss://app:***@db.example:6380/2"),
    ("redis://:p@ss@db:6379", "redis://:***@db:6379"),  # an unescaped '@' in the password
    ("redis://app@db:6379/0", "redis://app@db:6379/0"),  # a user name alone is no secret
    ("redis://db:6379/0", "redis://db:6379/0"),
    ("unix:///run/redis.sock?db=1&password=S3cret",
     "unix:///run/redis.sock?db=1&password=***"),
    ("redis://db/0?ssl_keyfile_password=S3cret&socket_timeout=1",
     "redis://db/0?ssl_keyfile_password=***&socket_timeout=1"),
    ("redis://db/0#S3cret", "redis://db/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
])
def test_secrets_are_replaced_and_the_rest_kept(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "S3cret" not in redact_url(url)


def test_never_raises() -> None:
    assert redact_url(None) == "-"
    assert redact_url("redis://[::1:6379/0") == "<unparseable url>"
    assert redact_url("") == ""

"""Credentials out of what the gateway logs or shows: ``redact_url``.

A connection URL may carry a secret in its user-info (``redis://user:secret@host``) or in its
query (``unix:///run/redis.sock?password=secret``). ``redact_url`` keeps everything an operator
needs to recognise the target (scheme, user name, host, port, path, other options) and replaces
each secret with ``***``. It never raises: what it cannot parse is replaced whole.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode, urlsplit

__all__ = ["REDACTED", "redact_url"]

REDACTED = "***"

# Query options whose value is a secret (compared case-insensitively).
_SECRET_OPTIONS = ("password", "passwd", "pass", "secret", "token", "auth", "credentials",
                   "ssl_password", "ssl_keyfile_password")


def _is_secret(option: str) -> bool:
    name = option.lower()
    return any(name == s or name.endswith("_" + s) for s in _SECRET_OPTIONS)


def redact_url(url: str | None) -> str:
    """``url`` with its password and secret query options replaced by ``***``.

    ``redis://:S3cret@db:6379/0`` -> ``redis://:***@db:6379/0``;
    ``redis://app:S3cret@db/0`` -> ``redis://app:***@db/0``;
    ``unix:///s.sock?db=1&password=S3cret`` -> ``unix:///s.sock?db=1&password=***``.
    None gives ``"-"``; a URL that cannot be parsed gives ``"<unparseable url>"``.
    """
    if url is None:
        return "-"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")  # a password may itself contain '@'
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if colon else f"{user}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _is_secret(k) else v) for k, v in pairs],
                              safe="*", quote_via=quote)
    # Rebuilt by hand: urlunsplit would turn "unix:///path" into "unix:/path". A fragment is
    # never sent to the server and may hold anything, so it is dropped.
    out = f"{parts.scheme}:" if parts.scheme else ""
    if netloc or url[len(out):].startswith("//"):
        out += "//" + netloc
    out += parts.path
    return out + "?" + query if query else out

"""Credentials out of URIs before a URI is shown, written or logged.

A tracking URI, a storage URI or a Ray address may carry credentials: userinfo
(``https://user:password@host``, ``postgresql://user:password@db/mlflow``) or a token in the
query (``?token=...``, a presigned ``X-Amz-Signature``, an Azure SAS ``sig``). Credentials belong
in the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, the cloud's own variables, Ray's
token); :func:`redact_uri` makes sure none that slipped into a URI reaches a report, a record
file, an MLflow param or a log line. The unredacted URI is still what the program connects to.
"""

from __future__ import annotations

import re

REDACTED = "***"

# scheme://rest, up to whitespace, a quote or an angle bracket (a URI inside a longer text)
_URI = re.compile(r"""\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")
# query parameters whose value is a secret: token, access_token, X-Amz-Security-Token, password,
# passwd, pwd, secret, client_secret, key, api_key, apikey, sig, signature, X-Amz-Signature,
# X-Amz-Credential, credential(s), auth, authorization
_SECRET_NAME = re.compile(
    r"(token|passw(or)?d|^pwd$|secret|(^|[_-])key$|^apikey$|^sig$|signature|credential|^auth)",
    re.IGNORECASE,
)


def _redact_one(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    netloc, tail = (rest, "") if end < 0 else (rest[:end], rest[end:])
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    if "?" in tail:
        path, _, query = tail.partition("?")
        query, hash_mark, fragment = query.partition("#")
        parts = []
        for item in query.split("&"):
            name, eq, _value = item.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and _SECRET_NAME.search(name) else item)
        tail = f"{path}?{'&'.join(parts)}{hash_mark}{fragment}"
    return f"{scheme}://{netloc}{tail}"


def redact_uri(text: str) -> str:
    """``text`` (a URI, or a message with URIs in it) with every URI's userinfo replaced by
    ``***`` and the values of its token-like query parameters too; the rest unchanged
    (``https://u:p@host/x?token=t&a=1`` gives ``https://***@host/x?token=***&a=1``). Text
    without ``scheme://`` (a path, ``host:port``) is returned as it is."""
    if "://" not in text:
        return text
    return _URI.sub(lambda m: _redact_one(m.group(0)), text)

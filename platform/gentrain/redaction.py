"""Spec values in messages: shortened, and never showing a secret.

A spec is logged to MLflow and uploaded by `gentrain submit`, so a password or token in
one of its URLs is refused at validation (`url_secret_problems`). Every message that
shows a spec value goes through `describe`, and every spec error through `redact`, so
such a secret is never echoed, not even in the error that refuses it:

    tracking.uri: 'http://***@mlflow.example.com' holds credentials (user info); ...
"""

from __future__ import annotations

import re
import reprlib

VALUE_LIMIT = 80  # characters of a value shown in a message

# Query parameters that carry credentials (lower case; matched as substrings), plus
# short names that are credentials only when they are the whole name.
SECRET_PARAM_PARTS = ("password", "passwd", "secret", "token", "signature", "credential",
                      "apikey", "api_key", "api-key", "accesskey", "access_key", "private_key")
SECRET_PARAM_NAMES = ("pwd", "key", "sig", "auth")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(//)?([^/?#]*)(.*)$", re.S)
# In free text: the user info of any scheme://user:pw@host, and secret query values.
_USERINFO_IN_TEXT = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s?#'\"]*@")
_PARAM_NAMES = "|".join(re.escape(p) for p in SECRET_PARAM_PARTS)
_PARAM_IN_TEXT = re.compile(
    rf"(?i)([?&;][\w.\-]*(?:{_PARAM_NAMES})[\w.\-]*=|[?&;](?:{'|'.join(SECRET_PARAM_NAMES)})=)"
    r"[^&\s'\"#]*")

class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, with each string redacted whole before it is cut."""

    def repr_str(self, value, level):
        value = redact(value)
        return repr(value) if len(value) <= self.maxstring else repr(value[:self.maxstring]) + "..."


_short = _ShortRepr()
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict = 3, 8, 8, 8
_short.maxstring, _short.maxother, _short.maxlong = VALUE_LIMIT, VALUE_LIMIT, VALUE_LIMIT


def redact(text: str) -> str:
    """`text` with the user info and secret query values of every URL in it as ***."""
    text = _USERINFO_IN_TEXT.sub(r"\1***@", text)
    return _PARAM_IN_TEXT.sub(r"\1***", text)


def describe(value: object, limit: int = VALUE_LIMIT) -> str:
    """A spec value for a message: repr for strings, redacted, at most ~`limit` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # str() of such an int is slow, and refused past 4,300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (list, tuple, dict, set)):
        text = _short.repr(value)  # bounded work, even for an enormous structure
    else:
        text = str(value)
    text = redact(text)
    if len(text) > limit:
        size = f"{len(value)} chars" if isinstance(value, str) else f"{len(text)} chars shown as text"
        text = f"{text[:limit]}... ({size})"
    return text


def _secret_params(query: str) -> list[str]:
    names = []
    for pair in re.split(r"[&;]", query):
        name = pair.partition("=")[0].lower()
        if name in SECRET_PARAM_NAMES or any(part in name for part in SECRET_PARAM_PARTS):
            names.append(name)
    return names


def url_secrets(value: str) -> list[str]:
    """What in URL `value` is a credential: 'user info', 'query parameter token', ..."""
    match = _URL.match(value.strip())
    if not match:
        return []
    authority, rest = match.group(3), match.group(4)
    found = ["user info"] if match.group(2) and "@" in authority else []
    query = rest.partition("?")[2].partition("#")[0]
    found += [f"query parameter {name!r}" for name in _secret_params(query)]
    return found


DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle", "sqlite", "mariadb")


def url_secret_problems(path: str, value: str | None) -> list[str]:
    """A problem for spec field `path` if its URL holds a credential, saying where it goes."""
    if not isinstance(value, str):
        return []
    found = url_secrets(value)
    if not found:
        return []
    scheme = value.strip().partition(":")[0].lower()
    if path == "tracking.uri" and scheme.partition("+")[0] in DATABASE_SCHEMES:
        fix = ("for a database store, put the whole URI in the environment variable "
               "MLFLOW_TRACKING_URI and leave tracking.uri null")
    elif path == "tracking.uri":
        fix = ("remove it and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
               "MLFLOW_TRACKING_TOKEN, in the environment (`gentrain submit` forwards them)")
    else:
        fix = ("remove it and give the store's credentials through the environment (e.g. "
               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ~/.netrc)")
    return [f"{path}: {describe(value)} holds credentials ({', '.join(found)}); secrets never "
            f"go in a spec (it is logged to MLflow and uploaded by `gentrain submit`): {fix}"]

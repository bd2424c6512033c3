"""Keep secrets out of everything cubebench records: params, tags, results, reports, logs.

A secret is the value of an environment variable whose name contains TOKEN, SECRET, PASSWORD
or KEY (AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN, ...), a storage option with such a name,
or the password part of a URL (`https://user:password@host`). Redaction replaces it by `***`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile("TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# shorter values (`1`, `yes`) would mask harmless text everywhere
_MIN_SECRET_LENGTH = 6


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment's secret-named variables, longest first."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """`text` with URL passwords and every known secret value masked."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return text


def scrub_tree(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like tree: secret-named keys masked, every string scrubbed."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {
            k: MASK if is_secret_name(str(k)) and v is not None else scrub_tree(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub_tree(v, secrets) for v in value]
    if isinstance(value, str):
        return scrub(value, secrets)
    return value

"""Reading diffusers config.json dictionaries strictly.

A diffusers config may switch on features these ports do not implement (class embeddings,
SDXL's added conditioning, ...). Rather than build a model that silently ignores them, every
key is either read, ignored for a stated reason, or required to keep the one value we
implement; anything else is an error that names the key.
"""

from __future__ import annotations

from typing import Any, Mapping

from dod_jax.errors import ConfigError


class UnsupportedConfigError(ConfigError):
    """A model config that asks for a feature these ports do not implement."""


def check_config(config: Mapping[str, Any], *, read: set[str], ignored: set[str],
                 fixed: Mapping[str, tuple], what: str) -> None:
    problems = []
    for key, value in config.items():
        if key.startswith("_") or key in read or key in ignored:
            continue
        if key in fixed:
            if value not in fixed[key]:
                allowed = " or ".join(repr(v) for v in fixed[key])
                problems.append(f"{key}={value!r} (only {allowed} is implemented)")
        else:
            problems.append(f"{key}={value!r} (unknown key)")
    if problems:
        raise UnsupportedConfigError(f"{what} config not supported: " + "; ".join(problems))

"""Names that clients choose for models and datasets, and that become folder names on disk."""

from __future__ import annotations

import re

from prelabel.errors import InvalidArgument, quote

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def validate_name(name: str, what: str = "model") -> str:
    """Names become folder names: lower-case letters, digits, '.', '_' and '-', at most 63."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:  # fullmatch: "$" would let a final newline in
        raise InvalidArgument(
            f"{what} name {quote(name)} is not valid: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name

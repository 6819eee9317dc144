"""User-facing errors: one clear paragraph, exit code 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterable

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training stopped on a non-finite loss


class UserError(Exception):
    """Bad input from the user (config, data, weights, checkpoint). Printed as one paragraph."""


def choices(values: Iterable[object], limit: int = 40) -> str:
    """Format allowed values for an error message, shortening very long lists."""
    items = [str(v) for v in values]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def bad_value(key: str, value: object, allowed: Iterable[object] | str) -> UserError:
    allowed_text = allowed if isinstance(allowed, str) else choices(allowed)
    return UserError(f"{key}={value!r} is not allowed. Allowed: {allowed_text}.")

"""Which upstream key a batch is sent with: the one for its exact target, else its
project's, else the default (`upstream_keys` and `upstream_key` in the settings)."""

from __future__ import annotations

from collections.abc import Callable

from collector.events import Target
from collector.settings import Settings


class KeyChooser:
    def __init__(self, default: str | None, scoped: dict[tuple[str, str | None], str]) -> None:
        self._default = default
        self._scoped = scoped

    def key_for(self, target: Target) -> str | None:
        return (
            self._scoped.get((target.project, target.env))
            or self._scoped.get((target.project, None))
            or self._default
        )


def key_chooser(settings_loader: Callable[[], Settings]) -> Callable[[], KeyChooser]:
    """A loader of the upstream keys from freshly read settings (for start and SIGHUP)."""

    def load() -> KeyChooser:
        settings = settings_loader()
        return KeyChooser(settings.upstream_key_value(), settings.project_key_values())

    return load

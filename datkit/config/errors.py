"""The one exception type for bad configuration: its message names the key and what is allowed."""


class ConfigError(ValueError):
    """Raised at start-up, before any worker trains, for an unknown key, a wrong type or an impossible value."""

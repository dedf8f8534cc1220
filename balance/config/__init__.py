"""
Balance's configuration: YAML with line marks (L{load}), validation into
frozen model objects (L{validate}, L{model}), and units (L{units}).
"""

from balance.config.validate import ConfigError, load_config

__all__ = ["ConfigError", "load_config"]

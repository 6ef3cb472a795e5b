"""distillery core: configuration, datasets, networks, evaluation, archives, the method registry and the CLI."""

__version__ = "0.1.0"

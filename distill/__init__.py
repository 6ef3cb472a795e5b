"""distillery core: configuration, datasets and their streaming loader, networks, the training pieces students and
teachers share (``training``), teacher and full-split training (``teacher``), evaluation, archives, the method
registry and the CLI."""

__version__ = "0.1.0"

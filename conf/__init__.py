"""The configs shipped with rdscale (`-c demo`): the package rdscale.conf, mapped onto this folder by pyproject.toml."""

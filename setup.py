"""Build script: the package itself is pure Python (see pyproject.toml)."""

from setuptools import setup

setup()

"""The one compiled part of kvd: kvd.native._copy (native/_copy.c), bulk copies with
non-temporal stores. ``optional``: where it does not build (no compiler), ``pip install``
still succeeds and kvd.native.copy uses numpy instead. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvd.native._copy", ["native/_copy.c"], optional=True, extra_compile_args=["-O2"])])

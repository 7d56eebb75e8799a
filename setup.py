"""The optional C extension (tunneld/_speedups.c); every other setting is in pyproject.toml.

``optional=True``: where it cannot be compiled (no C compiler, no Python headers) the install
goes on without it and tunneld runs its pure-Python code (tunneld/speedups.py), as aiohttp and
yarl do. ``TUNNELD_NO_EXTENSIONS=1`` at run time uses the pure-Python code even when it is built.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tunneld._speedups",
            ["tunneld/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)

"""Package build: generate the gRPC stubs first, so an installed wheel carries them.

Metadata lives in pyproject.toml; this file only adds the stub generation step.
"""

import runpy
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PACKAGES = ["eft_core", "eft_core.*", "services", "services.*", "cluster", "cluster.*"]


class BuildPyWithStubs(build_py):
    """build_py that runs proto/generate.py, then picks up the generated packages."""

    def run(self):
        runpy.run_path(str(Path(__file__).parent / "proto" / "generate.py"))["generate"]()
        self.packages = self.distribution.packages = find_packages(include=PACKAGES)
        super().run()


setup(
    packages=find_packages(include=PACKAGES),
    package_data={"services.pb": ["**/*.pyi"]},
    cmdclass={"build_py": BuildPyWithStubs},
)

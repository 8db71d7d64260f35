"""Everything is in pyproject.toml; this only ships fngd-plugin.pth to the top of site-packages
(setuptools has no declarative way to put a file there)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file("fngd-plugin.pth", os.path.join(self.build_lib, "fngd-plugin.pth"))


setup(cmdclass={"build_py": BuildWithPth})

"""Everything is in pyproject.toml; this only ships fngd-plugin.pth (the one line that loads the
plugins into timm and fairseq, see fngd_plugin_autoload.py) to the top of site-packages, for a
regular and for an editable install alike (setuptools has no declarative way to put a file there).
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "fngd-plugin.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


class EditableWithPth(editable_wheel):
    # setuptools lays out the editable wheel's root (site-packages) in a temporary directory and
    # calls this with it before zipping it; files put there are installed like the wheel's own.
    # tests/test_timm.py (autoload) fails if a setuptools release stops calling it.
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH), os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth})

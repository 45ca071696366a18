"""Build step that pyproject.toml can't express: ship the top-level dashboards/ and notebooks/ in the wheel.

Their sources stay where they are (the checkout's ``dashboards/``, ``notebooks/``); a regular (non-editable)
build copies them into the package as ``workbench/_data/dashboards`` and ``workbench/_data/notebooks``, where
``workbench.resources`` finds them. An editable install reads the checkout's folders directly.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# (source folder, glob patterns); source files only (and the Streamlit pages): no outputs, checkpoints or caches
PACKAGE_DATA = {"dashboards": ["*.py", "pages/*.py"], "notebooks": ["*.ipynb", "README.md"]}


class build_py_with_data(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        import shutil
        for folder, patterns in PACKAGE_DATA.items():
            dest = Path(self.build_lib) / "workbench" / "_data" / folder
            dest.mkdir(parents=True, exist_ok=True)
            for pat in patterns:
                for src in sorted((ROOT / folder).glob(pat)):
                    if src.is_file():
                        rel = src.relative_to(ROOT / folder)       # pages/x.py keeps its folder (Streamlit pages)
                        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, dest / rel)
                        self.announce(f"package data: {folder}/{rel} -> workbench/_data/{folder}/", 2)


setup(cmdclass={"build_py": build_py_with_data})

"""One lock around the dashboard pages' first imports of the workbench.

Streamlit runs each page in its own script thread, and a browser opening the parity page and then the divergence
page starts both at once. Two threads importing the ``workbench`` package at the same time can deadlock on
Python's per-module import locks (one holds ``workbench`` while its ``__init__`` imports ``workbench.diverge``,
the other holds ``workbench.diverge`` while it imports ``workbench.parity``); Python breaks the deadlock by
handing one of them a half-initialised module, and the page dies with "cannot import name 'diverge' from
partially initialized module" (seen in CI's browser test). The pages import under this lock, so one thread
finishes the package before the other starts. This module imports nothing of the project, so importing it can
not take part in such a cycle itself."""
import threading

LOCK = threading.RLock()

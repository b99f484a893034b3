"""pytest configuration of the tests: the hypothesis profiles.

The shared helpers live in ``tests/helpers.py``; import them with ``from helpers import ...`` (``pythonpath =
tests`` in setup.cfg). Importing ``conftest`` or another test module depends on pytest's import mode; the
re-export below only keeps such older imports working.
"""
import os

from helpers import connection_table, make_blobs, reserved_ids, task_split, tiny_config  # noqa: F401
from hypothesis import settings

# Under CI (CI=true) every hypothesis run draws the same examples, so a green run can be repeated; local runs keep
# exploring new examples. Test modules build their settings after this file loads, so they inherit the profile.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() not in ("", "0", "false") else "dev")

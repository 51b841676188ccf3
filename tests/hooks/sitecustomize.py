"""Test-only: Python imports this at start-up in processes the tests start with PYTHONPATH=tests/hooks;
with CIFARLIB_TEST_PAUSE_AT set, it installs `pause_hook` (see there)."""

import os

if os.environ.get("CIFARLIB_TEST_PAUSE_AT"):
    import pause_hook

    pause_hook.install(os.environ["CIFARLIB_TEST_PAUSE_AT"], os.environ.get("CIFARLIB_TEST_PAUSE_WHEN", "written"))

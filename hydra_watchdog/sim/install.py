"""TabbyAPI's install tree, laid out for the simulator.

On hydra-ai TabbyAPI runs as `python main.py` from /opt/tabbyapi, and the watchdog knows it by
that: its program lies inside the install tree (adapters/identity.py). The simulator is run the
same way, from a `main.py` in a tree of its own, so the demo, the tests and the benchmarks meet
the identity rules production meets, never a looser stand-in.
"""

from __future__ import annotations

import sys
from pathlib import Path

LAUNCHER = """\
# TabbyAPI's main.py, as laid out by hydra_watchdog.sim.install: runs the simulator.
import runpy

runpy.run_module("hydra_watchdog.sim.tabby_server", run_name="__main__", alter_sys=True)
"""


# The backends each build ships (adapters/backend.py tells the build by them): the exl2-era
# builds both, today's ExLlamaV3 only (notes/tabbyapi.md).
BACKENDS = {"exl2": ("exllamav2", "exllamav3"), "modern": ("exllamav3",)}


def lay_out(root: Path | str, python: str = sys.executable, *, flavor: str = "exl2") -> list[str]:
    """Write `<root>/main.py` and the backends' folders of the `flavor` build; the argv prefix
    that runs the simulator from there."""
    tree = Path(root)
    tree.mkdir(parents=True, exist_ok=True)
    main = tree / "main.py"
    main.write_text(LAUNCHER, encoding="utf-8")
    for backend in BACKENDS[flavor]:
        package = tree / "backends" / backend
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("", encoding="utf-8")
    return [python, str(main)]

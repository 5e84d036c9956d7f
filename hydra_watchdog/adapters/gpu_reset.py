"""`nvidia-smi --gpu-reset -i N`, bounded: an adapter (interfaces.GpuResetter).

Only the command: whether a reset is safe (enabled, nobody else on the card) is decided by
act/gpu_reset.py before it calls this.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import ResetOutcome
from hydra_watchdog.printable import cut

_OUTPUT_MAX = 300


class NvidiaSmiReset:
    def __init__(self, command: Sequence[str] = ("nvidia-smi",)) -> None:
        self.command = tuple(command)

    def reset(self, index: int, timeout: float) -> ResetOutcome:
        program = self.command[0]
        argv = [*self.command, "--gpu-reset", "-i", str(index)]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError:
            return ResetOutcome(False, f"{program} not found", ErrorKind.NOT_FOUND)
        except subprocess.TimeoutExpired:
            return ResetOutcome(False, f"GPU reset took over {timeout:g}s", ErrorKind.TIMEOUT)
        except OSError as exc:
            return ResetOutcome(False, f"cannot run {program}: {exc}", ErrorKind.EXEC_FAILED)
        output = cut(" ".join((proc.stdout + " " + proc.stderr).split()), _OUTPUT_MAX)
        if proc.returncode != 0:
            detail = f"exit {proc.returncode}: {output}"
            return ResetOutcome(False, detail, ErrorKind.COMMAND_FAILED)
        return ResetOutcome(True, output or f"gpu{index} reset")

    def close(self) -> None:
        """Holds nothing between resets."""

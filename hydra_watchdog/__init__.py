"""hydra-watchdog: TabbyAPI's incident runbook as an on-node watchdog."""

__version__ = "0.1.0"

"""`make bench`: recovery time and overhead of hydra-watchdog against systemd alone and monit.

Everything that touches the simulated node runs inside a throw-away systemd namespace
(tests/harness/systemd_ns.py); the host side only boots it, runs `python -m bench.inside` in it
and turns the JSON it writes into bench/RESULTS.md and bench/recovery.png.
"""

"""Model-based testing of the policy (issue 13): a model of the node, and an oracle over it.

`model.py` is the node (TabbyAPI, systemd, processes, GPUs, host) written without the policy's
code; `oracle.py` drives decide() against it on seeded traces and checks, at every step, what a
careful human with the runbook would conclude. Only data types are shared with the watchdog.
"""

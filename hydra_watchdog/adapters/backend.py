"""Which inference backend TabbyAPI serves a model with, told from its files.

TabbyAPI's builds differ (notes/tabbyapi.md): the ones hydra-ai ran until 2026-07 ship two
backends, ExLlamaV2 (exl2 models; its compiled extension is what a NixOS rebuild breaks) and
ExLlamaV3; today's builds ship ExLlamaV3 only (exl3 and unquantized models) and refuse an exl2
model for good. `verify` checks what the running build needs, not what an old one did. It tells,
reading files only (nothing is imported or run, so a broken venv cannot hang it):

1. the build: which `backends/<name>/` folders TabbyAPI's install tree ships (the first of
   `tabbyapi.cmdline_patterns` that holds TabbyAPI's main.py);
2. the backend chosen for the model: `model.backend` of config.yml in that tree, when set;
   otherwise TabbyAPI's own rule, by the model folder's config.json
   `quantization_config.quant_method`: exl3 -> exllamav3; exl2 or gptq -> exllamav2; none
   (unquantized) -> exllamav2 where the build ships it, else exllamav3;
3. whether the build can serve it: the chosen backend ships with the build, and its package is
   installed in `tabbyapi.venv` (when one is configured).

Not read: a backend chosen on TabbyAPI's command line or in its environment (--backend,
TABBY_MODEL_BACKEND): config.yml is where hydra-ai sets it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from hydra_watchdog.regular_file import UnusableFileError, read_regular

BACKENDS = ("exllamav2", "exllamav3")
_NEEDS = {"exl2": "exllamav2", "gptq": "exllamav2", "exl3": "exllamav3"}
_SMALL = 1 << 20  # config.yml and a model's config.json are a few KiB


@dataclass(frozen=True)
class Backend:
    name: str  # "exllamav2", "exllamav3", or "" when it cannot be told
    how: str  # how it was told, or why it could not be
    problem: str = ""  # why this build cannot serve the model with it ("" when it can)
    shipped: tuple[str, ...] = ()  # the backends the build ships


def install_tree(install_dirs: Sequence[str]) -> str | None:
    """The first install dir that holds TabbyAPI's main.py."""
    return next((d for d in install_dirs if os.path.isfile(os.path.join(d, "main.py"))), None)


def _read_small(path: str) -> str | None:
    try:
        data, _ = read_regular(path, _SMALL, follow=True)
        return data.decode("utf-8", "replace")
    except (OSError, UnusableFileError):
        return None


def configured_backend(config_yml: str) -> str:
    """`model.backend` of TabbyAPI's config.yml ("" when not set). Its config is plain block
    YAML: a top-level `model:` and, indented under it, `backend: <name>`."""
    in_model = False
    for raw in config_yml.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            in_model = line.strip() == "model:"
            continue
        key, colon, value = line.strip().partition(":")
        if in_model and colon and key == "backend":
            return value.strip().strip("'\"")
    return ""


def quant_method(model_dir: str) -> str | None:
    """The model folder's `quantization_config.quant_method` ("" unquantized); None when its
    config.json cannot be read."""
    text = _read_small(os.path.join(model_dir, "config.json"))
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    quant = doc.get("quantization_config") if isinstance(doc, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method.lower() if isinstance(method, str) else ""


def _installed(venv: str, name: str) -> bool:
    site = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    return any(os.path.isdir(os.path.join(sp, name)) for sp in site)


def detect(install_dirs: Sequence[str], venv: str, model_dir: str) -> Backend:
    """The backend TabbyAPI serves the model in `model_dir` with (see the module's doc)."""
    tree = install_tree(install_dirs)
    if tree is None:
        return Backend("", f"no TabbyAPI main.py in {', '.join(install_dirs) or 'no install dir'}")
    shipped = tuple(b for b in BACKENDS if os.path.isdir(os.path.join(tree, "backends", b)))
    if not shipped:
        return Backend("", f"{tree}/backends holds no ExLlama backend")
    chosen = configured_backend(_read_small(os.path.join(tree, "config.yml")) or "")
    method = quant_method(model_dir)
    only = f"this build ships only {shipped[0]}" if len(shipped) == 1 else ""
    if chosen:
        how = f"model.backend in {tree}/config.yml"
    elif method is None:
        return Backend("", f"cannot read {model_dir}/config.json", shipped=shipped)
    else:
        default = "exllamav2" if "exllamav2" in shipped else "exllamav3"
        chosen = _NEEDS.get(method, default)
        how = only or f"for an {method} model" if method else only or "for an unquantized model"
    needs = _NEEDS.get(method or "")
    problem = ""
    if chosen not in shipped:
        quantized = f"it is quantized with {method}" if method else "it is unquantized"
        problem = f"{quantized}, which needs {chosen}" + ("" if only else "; the build lacks it")
        chosen = shipped[0] if len(shipped) == 1 else ""  # what this build runs, if it says
    elif needs is not None and needs != chosen:
        problem = f"it is quantized with {method}, which the {chosen} backend cannot load"
    elif venv and os.path.isdir(venv) and not _installed(venv, chosen):
        problem = f"the {chosen} package is not installed in {venv}"
    return Backend(chosen, how, problem, shipped)

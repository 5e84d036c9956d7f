"""HostProbe against real folders and a real ELF whose library was deleted after linking."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hydra_watchdog.adapters.host import (
    HostProbe,
    check_libraries,
    check_models_dir,
    find_extensions,
    inspect_model,
    parse_ldd,
)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


def make_model(models: Path, name: str, *, config: bool = True, weights: int = 2) -> Path:
    folder = models / name
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text("{}")
    for i in range(weights):
        (folder / f"output-{i}.safetensors").write_bytes(b"\0" * 1000)
    return folder


def site_packages(venv: Path) -> Path:
    sp = venv / "lib" / "python3.11" / "site-packages"
    sp.mkdir(parents=True)
    return sp


def build_extension(tmp_path: Path, sp: Path, *, with_dependency: bool) -> Path:
    """A real shared object named like ExLlamaV2's extension, linked against libhwdep.so."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "dep.c").write_text("int hw_dep(void) { return 42; }\n")
    (src / "ext.c").write_text("int hw_dep(void);\nint hw_ext(void) { return hw_dep(); }\n")
    libdir = tmp_path / "libs"
    libdir.mkdir(exist_ok=True)
    dep = libdir / "libhwdep.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dep), str(src / "dep.c")], check=True)
    ext = sp / "exllamav2_ext.cpython-311-x86_64-linux-gnu.so"
    subprocess.run(
        [
            "gcc", "-shared", "-fPIC", "-o", str(ext), str(src / "ext.c"),
            f"-L{libdir}", "-lhwdep", f"-Wl,-rpath,{libdir}",
        ],
        check=True,
    )  # fmt: skip
    if not with_dependency:
        dep.unlink()  # what a NixOS rebuild does to the store path the extension links to
    return ext


# -- models folder --------------------------------------------------------------------------


def test_models_dir_states(tmp_path: Path) -> None:
    assert check_models_dir(str(tmp_path / "nope"), require_mount=False) == (
        False,
        f"{tmp_path / 'nope'} missing",
    )
    empty = tmp_path / "models"
    empty.mkdir()
    ok, detail = check_models_dir(str(empty), require_mount=False)
    assert not ok and "empty and not a mount point" in detail
    make_model(empty, "m")
    ok, detail = check_models_dir(str(empty), require_mount=False)
    assert ok and "not a mount point but holds 1 entries" in detail
    ok, detail = check_models_dir(str(empty), require_mount=True)
    assert not ok and "not a mount point" in detail
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert check_models_dir(str(a_file), require_mount=False)[1].endswith("not a directory")


def test_a_mount_point_is_ok_even_when_required() -> None:
    # /proc is a mount point on every Linux host; nothing is written there.
    assert check_models_dir("/proc", require_mount=True) == (True, "/proc is a mount point")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_models_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    ok, detail = check_models_dir(str(locked), require_mount=False)
    assert not ok and "not readable" in detail


# -- model folders ----------------------------------------------------------------------------


def test_model_folder_checks_and_size(tmp_path: Path) -> None:
    make_model(tmp_path, "good", weights=3)
    (tmp_path / "good" / "sub").mkdir()
    (tmp_path / "good" / "sub" / "tokenizer.json").write_bytes(b"x" * 24)
    good = inspect_model(str(tmp_path), "good")
    assert good.usable
    assert good.weight_files == 3
    assert good.size_bytes == 3 * 1000 + 2 + 24
    assert good.detail == ""

    make_model(tmp_path, "noconf", config=False)
    make_model(tmp_path, "noweights", weights=0)
    assert inspect_model(str(tmp_path), "noconf").detail == "no config.json"
    assert inspect_model(str(tmp_path), "noweights").detail == "no *.safetensors"
    missing = inspect_model(str(tmp_path), "absent")
    assert not missing.exists and "missing" in missing.detail
    assert not inspect_model(str(tmp_path), "../etc").exists


def test_probe_reports_model_and_fallback(tmp_path: Path) -> None:
    make_model(tmp_path, "big")
    probe = HostProbe(str(tmp_path), "big", "small", str(tmp_path / "no-venv"))
    report = probe.check(libraries=False)
    assert report.models_dir_ok
    assert report.model is not None and report.model.usable
    assert report.fallback is not None and not report.fallback.exists
    assert report.missing_libraries is None  # not checked this cycle
    assert HostProbe(str(tmp_path), "", "", "").check(libraries=False).model is None


# -- libraries ------------------------------------------------------------------------------


def test_parse_ldd() -> None:
    text = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibhwdep.so => not found\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n"
        "\tlibcudart.so.12 => not found\n"
        "\tlibhwdep.so => not found\n"
    )
    assert parse_ldd(text) == ("libhwdep.so", "libcudart.so.12")


@needs_gcc
def test_deleted_library_is_reported_not_found(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    build_extension(tmp_path, site_packages(venv), with_dependency=False)
    report = HostProbe(str(tmp_path), "", "", str(venv)).check(libraries=True)
    assert report.missing_libraries == ("libhwdep.so",)
    assert "checked 1 extension(s)" in report.libraries_detail


@needs_gcc
def test_intact_extension_has_no_missing_libraries(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    sp = site_packages(venv)
    build_extension(tmp_path, sp, with_dependency=True)
    # A second extension inside the package is checked too.
    pkg = sp / "exllamav2"
    pkg.mkdir()
    shutil.copy(sp / "exllamav2_ext.cpython-311-x86_64-linux-gnu.so", pkg / "inner.so")
    check = check_libraries(str(venv), timeout=30.0)
    assert check.missing == ()
    assert "checked 2 extension(s)" in check.detail


def test_missing_venv_or_extension_is_reported_not_raised(tmp_path: Path) -> None:
    gone = check_libraries(str(tmp_path / "absent"), timeout=5.0)
    assert gone.missing is None and "missing" in gone.detail
    venv = tmp_path / "venv"
    site_packages(venv)
    none = check_libraries(str(venv), timeout=5.0)
    assert none.missing is None and "no ExLlamaV2 extension" in none.detail
    assert check_libraries("", timeout=5.0).detail == "no venv configured"


def test_not_an_elf_is_reported_not_raised(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    sp = site_packages(venv)
    (sp / "exllamav2_ext.so").write_text("not an ELF")
    check = check_libraries(str(venv), timeout=10.0)
    assert check.missing is None
    assert "exllamav2_ext.so" in check.detail


# -- the extension search in a hostile venv tree (issue 10 item 4) ----------------------------


def plant_loops(folder: Path) -> None:
    """Symlinked folders that lead back up the tree: glob's `**` followed them until it hung."""
    (folder / "loop").symlink_to("..")
    (folder / "loop2").symlink_to("../..")
    (folder / "self").symlink_to(".")


@pytest.mark.timeout(60)  # a regression hangs here; the bound makes it a failure, not a stall
@needs_gcc
def test_symlink_loops_in_the_venv_are_not_followed(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    sp = site_packages(venv)
    build_extension(tmp_path, sp, with_dependency=False)
    pkg = sp / "exllamav2" / "ext"
    pkg.mkdir(parents=True)
    shutil.copy(sp / "exllamav2_ext.cpython-311-x86_64-linux-gnu.so", pkg / "inner.so")
    plant_loops(pkg)
    plant_loops(sp / "exllamav2")
    (venv / "lib64").symlink_to("lib")  # what `python -m venv` makes on x86_64
    check = check_libraries(str(venv), timeout=30.0)
    # Both real files, each once: nothing reached through a loop is counted again.
    assert "checked 2 extension(s)" in check.detail
    assert check.missing == ("libhwdep.so",)


@pytest.mark.timeout(60)
def test_symlink_loops_without_an_extension_finish_with_none_found(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    pkg = site_packages(venv) / "exllamav2"
    pkg.mkdir()
    plant_loops(pkg)
    (pkg / "model.py").write_text("")
    check = check_libraries(str(venv), timeout=5.0)
    assert check.missing is None
    assert "no ExLlamaV2 extension" in check.detail


def test_extension_search_is_bounded_in_depth(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    pkg = site_packages(venv) / "exllamav2"
    shallow = pkg / "a" / "b"
    shallow.mkdir(parents=True)
    (shallow / "near.so").write_bytes(b"")
    deep = pkg.joinpath(*[f"d{i}" for i in range(20)])  # deeper than any real package
    deep.mkdir(parents=True)
    (deep / "far.so").write_bytes(b"")
    found, cut_short = find_extensions(str(venv))
    assert [Path(f).name for f in found] == ["near.so"] and cut_short == ""


@pytest.mark.slow
def test_extension_search_is_bounded_in_entries(tmp_path: Path) -> None:
    crowded = site_packages(tmp_path / "venv2") / "exllamav2" / "crowded"
    crowded.mkdir(parents=True)
    for i in range(50_001):
        (crowded / f"f{i}").touch()
    found, cut_short = find_extensions(str(tmp_path / "venv2"))
    assert (found, cut_short) == ((), "stopped looking after 50000 entries")
    check = check_libraries(str(tmp_path / "venv2"), timeout=5.0)
    assert check.missing is None  # nothing found before the bound: could not check, no guess
    assert "stopped looking after 50000 entries" in check.detail

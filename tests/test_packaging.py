"""The wheel holds every package folder on disk, mapped to its import name."""
import importlib
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"seqgen": "seqgen", "domains": "seqgen/domains", "backbones": "seqgen/backbones", "heads": "seqgen/heads"}


def packages_on_disk() -> set[str]:
    """Import names of every folder holding an __init__.py under the four package roots."""
    out = set()
    for folder, target in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            parts = [] if str(rel) == "." else list(rel.parts)
            if "__pycache__" in parts:
                continue
            out.add(".".join(target.split("/") + parts))
    return out


def test_pyproject_lists_every_package_folder():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert declared == packages_on_disk()


def modules_on_disk() -> set[str]:
    """Import names of every module file under the four package roots."""
    out = set()
    for folder, target in MAPPING.items():
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.parent.parts) + ([] if py.name == "__init__.py" else [py.stem])
            out.add(".".join(target.split("/") + parts))
    return out


# modules the multi-domain runtime added: plain modules of the seqgen package (no new package to list)
NEW_MODULES = ("seqgen.examples", "seqgen.generate", "seqgen.scenes", "seqgen.emoji", "seqgen.precision")


def test_every_module_is_inside_a_declared_package():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    modules = modules_on_disk()
    assert set(NEW_MODULES) <= modules
    orphans = sorted(m for m in modules if m not in declared and m.rsplit(".", 1)[0] not in declared)
    assert not orphans, f"modules outside every package listed in pyproject.toml: {orphans}"


@pytest.mark.parametrize("module", NEW_MODULES)
def test_new_runtime_modules_import_from_the_package(module):
    mod = importlib.import_module(module)
    assert Path(mod.__file__).resolve() == ROOT / (module.replace(".", "/") + ".py")


@pytest.mark.slow
def test_built_wheel_contains_every_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("seqgen-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py") or
                n.endswith("__init__.py")}
    assert packages_on_disk() <= in_wheel, packages_on_disk() - in_wheel
    # every module file on disk is in the wheel
    for folder, target in MAPPING.items():
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            assert f"{target}/{py.relative_to(ROOT / folder).as_posix()}" in names
    assert any(n.endswith("entry_points.txt") and "seqgen" in n for n in names)
    # ... and imports from the installed wheel (not from this checkout)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(target)!r}); "
            "import seqgen, seqgen.domains.image, seqgen.domains.text, seqgen.backbones.transformer, "
            "seqgen.heads.categorical, seqgen.paradigms.ar, " + ", ".join(NEW_MODULES) + "; "
            "from seqgen.registry import DOMAINS, BACKBONES; DOMAINS.get('image'); BACKBONES.get('transformer'); "
            "print(seqgen.__file__); print(seqgen.domains.image.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(line.startswith(str(target)) for line in r.stdout.split()), r.stdout

"""The wheels slimforge needs on the GPU machine, whose image has PyTorch but no package registry.

    python scripts/gpu_wheels.py prepare [--out .gpu_wheels]        # here, where the registry is reachable
    python3 scripts/gpu_wheels.py install [--wheels .gpu_wheels] [--venv .gpu_venv]   # there, offline
    python scripts/gpu_wheels.py image-requirements                 # the image's share, to rebuild it elsewhere

``prepare`` walks slimforge's requirements (``pyproject.toml``: the core and the ``deepspeed`` extra) for the image's
Python and platform, against the image's package list (``scripts/gpu_image.txt``), and downloads the wheels of
exactly what the image lacks into ``--out`` with ``manifest.json`` (each wheel's name, version, size, SHA-256 and why
it travels). Versions are the tested ones of ``scripts/constraints.txt`` where they fit. A package the image
has is used as it is: where the list gives its version and that version misses a bound slimforge's requirements
set, the wheel travels marked ``install_if`` (installed there only when the image's real version misses the bound);
where the list gives no version, a direct requirement of slimforge travels the same way if its wheel is small
(``FALLBACK_BYTES``), and otherwise the bound is recorded under ``assumed`` and ``install`` reports a miss there (not
fatal: metadata bounds are often stricter than the code). DeepSpeed publishes only a source archive; it travels as a
pure-Python wheel built here without its compiled ops (``DS_BUILD_OPS=0``; slimforge uses none of them). Packages
too large to travel (``onnxruntime-gpu``) are listed under ``left_out`` with the reason.

``install`` makes a virtual environment over the image's own packages (they stay visible, as with
``--system-site-packages``, and are never modified), installs the needed wheels and slimforge (editable) with pip's
index disabled, writes launchers for the image's console scripts that slimforge runs (``accelerate``), and checks
that torch, torchvision, numpy and onnxruntime are still the image's own and that every module the GPU check
imports loads. Exit status: 0 ready, 1 a check failed (said why), 2 usage.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable
from email.parser import Parser
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
IMAGE_LIST = ROOT / "scripts" / "gpu_image.txt"
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"
MAX_BYTES = 60 * 2**20
FALLBACK_BYTES = 4 * 2**20
"""A direct requirement the image has at an unknown version travels as a fallback (``install_if``) up to this size."""
PROTECTED = ("torch", "torchvision", "numpy", "onnxruntime")
"""The image's builds, matched to its driver and CUDA: never replaced, only used."""
LEFT_OUT = {
    "onnxruntime-gpu": "about 250 MB, too large to travel; ONNX Runtime's CUDA and TensorRT rows run only if the "
    "image's own onnxruntime offers those providers (checked at run time), else they are skipped with that reason",
}
EXTRAS = ("deepspeed",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
GPU_MODULES = (
    "torch", "torchvision", "timm", "accelerate", "datasets", "safetensors", "yaml", "tqdm", "tensorboard", "numpy",
    "onnx", "onnxscript", "onnxruntime", "mlxtend", "sklearn", "torch_pruning", "deepspeed", "transformers",
    "slimforge.train.engine.loop", "slimforge.export.benchmarking", "slimforge.export.runtimes.ort",
)  # fmt: skip
"""Every module the GPU check's items import (tests/test_gpu_check.py checks the list against the image and the
manifest)."""


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image(path: Path = IMAGE_LIST) -> tuple[dict[str, str | None], str]:
    """``({canonical name: version or None}, python "X.Y")`` of the image list."""
    packages: dict[str, str | None] = {}
    python = "3.12"
    for line in path.read_text().splitlines():
        if line.startswith("# python=="):
            python = line.split("==", 1)[1].strip()
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canon(name)] = version.strip() or None
    return packages, python


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canon(name)] = version.strip()
    return pins


def roots() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return reqs


def marker_env(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": python + ".0", "platform_system": "Linux",
            "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip


def download(spec: str, python: str, dest: Path) -> Path:
    """One wheel for the image's Python and platform (``spec`` like ``name==1.0``), built here if the project
    publishes no wheel."""
    tag = python.replace(".", "")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        f"cp{tag}",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "-d",
        str(dest),
        spec,
    ]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", p]
    before = set(dest.iterdir())
    proc = subprocess.run(cmd, capture_output=True, text=True)
    new = set(dest.iterdir()) - before
    if proc.returncode == 0 and new:
        return new.pop()
    if proc.returncode == 0:  # already there
        return find_wheel(dest, spec)
    # No wheel for it (DeepSpeed ships only a source archive): build a pure-Python one here.
    return build_wheel(spec, dest, proc.stderr)


def find_wheel(dest: Path, spec: str) -> Path:
    name, _, version = spec.partition("==")
    stem = canon(name).replace("-", "_")
    for f in dest.glob("*.whl"):
        n, v = f.name.split("-")[:2]
        if canon(n).replace("-", "_") == stem and (not version or v == version):
            return f
    raise SystemExit(f"prepare: {spec} was not downloaded into {dest}")


def build_wheel(spec: str, dest: Path, why: str) -> Path:
    try:
        import torch  # noqa: F401  (DeepSpeed's setup.py imports it)
    except ImportError:
        raise SystemExit(f"prepare: no wheel of {spec} ({why.strip().splitlines()[-1] if why else ''}) and no torch "
                         "here to build one: run it with the environment of scripts/setup.sh "
                         "(.venv/bin/python scripts/gpu_wheels.py prepare)") from None  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise SystemExit(f"prepare: building a wheel of {spec} failed:\n{proc.stderr[-1500:]}")
        if not wheels[0].name.endswith("-none-any.whl"):
            raise SystemExit(f"prepare: the wheel built for {spec} is not pure Python ({wheels[0].name})")
        target = dest / wheels[0].name
        target.write_bytes(wheels[0].read_bytes())
        return target


def requirements_of(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    return msg.get_all("Requires-Dist") or []


class Fetched(NamedTuple):
    """What ``fetch`` found for one requirement: the version, its own requirements, and the wheel's file facts
    (``file``, ``bytes``, ``sha256``; empty where nothing was downloaded)."""

    version: str
    requires: list[str]
    wheel: dict


def walk(image: dict[str, str | None], python: str, fetch: Callable[[str, str], Fetched]) -> dict:
    """Decides what travels: slimforge's requirements for ``python`` on Linux x86_64, followed through every
    package that travels, against the image's list.

    Args:
        image: The image's packages (:func:`read_image`).
        python: The image's Python, ``"3.12"``.
        fetch: ``fetch(name, spec)`` → :class:`Fetched` for ``name`` at ``spec`` (``"==1.2"`` or a range).

    Returns:
        The manifest's decisions: ``wheels`` (one entry per package that travels, ``install_if`` set where the
        image has the package and the wheel is a fallback), ``left_out``, ``assumed``, ``notes``.
    """
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    pins = read_pins()
    env = marker_env(python)
    specs: dict[str, SpecifierSet] = {}
    why: dict[str, list[str]] = {}
    queue = [(r, "slimforge") for r in roots()]
    carried: dict[str, dict] = {}
    left_out: dict[str, str] = {}
    notes: list[str] = []
    assumed: set[str] = set()
    while queue:
        text, parent = queue.pop(0)
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canon(req.name)
        specs[name] = specs.get(name, SpecifierSet()) & req.specifier
        why.setdefault(name, []).append(f"{parent}: {req.specifier or 'any'}")
        if name in LEFT_OUT:
            left_out[name] = LEFT_OUT[name]
            continue
        have = image.get(name)
        if name in PROTECTED:
            if have and not specs[name].contains(Version(have), prereleases=True):
                notes.append(f"{name} {have} in the image misses {specs[name]} ({parent}): used as it is")
            continue
        if name in image:
            if have is None and (parent != "slimforge" or not str(specs[name])):
                if str(specs[name]):  # assumed to serve; install checks the image's real version and warns
                    assumed.add(name)
                continue
            if have is not None and specs[name].contains(Version(have), prereleases=True):
                continue  # the image's own version serves
        if name in carried and specs[name].contains(Version(carried[name]["version"]), prereleases=True):
            continue
        pin = pins.get(name)
        spec = f"=={pin}" if pin and specs[name].contains(Version(pin), prereleases=True) else str(specs[name])
        got = fetch(req.name, spec)
        if name in image and have is None and got.wheel.get("bytes", 0) > FALLBACK_BYTES:
            assumed.add(name)  # a fallback for an unknown version only when it is small
            continue
        carried[name] = {"name": name, "version": got.version, **got.wheel,
                         "install_if": None if name not in image else str(specs[name])}  # fmt: skip
        queue += [(r, name) for r in got.requires]
    for entry in carried.values():
        entry["why"] = why[entry["name"]]
        if entry["install_if"] is not None:
            entry["install_if"] = str(specs[entry["name"]])
        if not specs[entry["name"]].contains(Version(entry["version"]), prereleases=True):
            notes.append(f"{entry['name']} {entry['version']} travels but misses {specs[entry['name']]}")
    return {
        "wheels": sorted(carried.values(), key=lambda e: e["name"]),
        "left_out": [{"name": k, "reason": v} for k, v in sorted(left_out.items())],
        "assumed": {n: str(specs[n]) for n in sorted(assumed - set(carried))},
        "notes": notes,
    }


def prepare(out: Path) -> int:
    image, python = read_image()
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        f.unlink()

    def fetch(name: str, spec: str) -> Fetched:
        wheel = download(name + spec, python, out)
        size = wheel.stat().st_size
        facts = {"file": wheel.name, "bytes": size, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
        got = Fetched(wheel.name.split("-")[1], requirements_of(wheel), facts)
        if image.get(canon(name), "") is None and size > FALLBACK_BYTES:
            wheel.unlink()  # walk() keeps the image's own version instead
        else:
            print(f"[prepare] {wheel.name} ({size / 2**20:.1f} MiB)")
        return got

    decided = walk(image, python, fetch)
    total = sum(e["bytes"] for e in decided["wheels"])
    manifest = {"created": time.strftime("%Y-%m-%d"), "python": python, "platforms": list(PLATFORMS),
                "image_list": str(IMAGE_LIST.relative_to(ROOT)), **decided, "total_bytes": total}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    left = ", ".join(e["name"] for e in decided["left_out"]) or "nothing"
    print(f"[prepare] {len(decided['wheels'])} wheels, {total / 2**20:.1f} MiB in {out} "
          f"(limit {MAX_BYTES / 2**20:.0f} MiB); left out: {left}")  # fmt: skip
    for e in decided["wheels"]:
        if e["install_if"]:
            print(f"[prepare] {e['file']} is installed there only if the image's {e['name']} misses {e['install_if']}")
    for n in decided["notes"]:
        print(f"[prepare] note: {n}")
    if total > MAX_BYTES:
        print(f"prepare: the wheelhouse is {total / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB that may "
              "travel: leave a package out in LEFT_OUT", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def image_site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def versions(python: str, names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """``{name: (version, location)}`` as ``python`` sees them (``("", "")`` when absent)."""
    code = (
        "import json, sys, importlib.metadata as md\nout = {}\nfor n in sys.argv[1:]:\n"
        "    try:\n        d = md.distribution(n); out[n] = (d.version, str(d.locate_file('')))\n"
        "    except md.PackageNotFoundError:\n        out[n] = ('', '')\nprint(json.dumps(out))"
    )
    proc = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=True)
    return {k: tuple(v) for k, v in json.loads(proc.stdout).items()}


def choose(wheels: list[dict], have: dict[str, str]) -> tuple[list[dict], list[str]]:
    """``(the manifest entries to install, "name version" of the image's packages kept instead)``: a wheel marked
    ``install_if`` is skipped when the image's version (``have``, "" when absent) meets that bound."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    chosen, kept = [], []
    for e in wheels:
        v = have.get(e["name"], "")
        if e["install_if"] and v and SpecifierSet(e["install_if"]).contains(Version(v), prereleases=True):
            kept.append(f"{e['name']} {v}")
        else:
            chosen.append(e)
    return chosen, kept


def install(wheels: Path, venv: Path) -> int:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    manifest_path = wheels / "manifest.json"
    if not manifest_path.is_file():
        print(f"install: {manifest_path} is missing: run `python scripts/gpu_wheels.py prepare` where the package "
              "registry is reachable, and carry the folder", file=sys.stderr)  # fmt: skip
        return 1
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != manifest["python"]:
        print(f"install: the wheels are for Python {manifest['python']}, this is {here}: prepare them for this "
              "Python (the '# python==' line of scripts/gpu_image.txt)", file=sys.stderr)  # fmt: skip
        return 1
    start = time.perf_counter()
    before = versions(sys.executable, PROTECTED)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # The image's packages stay visible behind the venv's own (what --system-site-packages gives when the image's
    # Python is itself a venv): addsitedir also reads the .pth files there.
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    lines = [f"import site; site.addsitedir({d!r})" for d in image_site_dirs()]
    (site / "zz_image_site.pth").write_text("\n".join(lines) + "\n")
    names = tuple(e["name"] for e in manifest["wheels"]) + tuple(manifest.get("assumed", {}))
    image_has = versions(sys.executable, names)
    misses = [
        f"{n} {image_has[n][0] or '(absent)'} misses {spec}"
        for n, spec in manifest.get("assumed", {}).items()
        if not image_has[n][0] or not SpecifierSet(spec).contains(Version(image_has[n][0]), prereleases=True)
    ]
    chosen, kept = choose(manifest["wheels"], {n: v for n, (v, _) in image_has.items()})
    chosen = [str(wheels / e["file"]) for e in chosen]
    pip = [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--ignore-installed",
           "--disable-pip-version-check", "--no-cache-dir", "--quiet"]  # fmt: skip
    if chosen and subprocess.run([*pip, *chosen]).returncode != 0:
        print("install: pip could not install the wheels (above)", file=sys.stderr)
        return 1
    if subprocess.run([*pip, "-e", str(ROOT)]).returncode != 0:
        print("install: pip could not install slimforge (above)", file=sys.stderr)
        return 1
    # Launchers for the image's console scripts that slimforge's launches call by path (venv/bin/accelerate).
    for ep in md.entry_points(group="console_scripts"):
        if ep.name in ("accelerate", "torchrun") and not (venv / "bin" / ep.name).exists():
            launcher = venv / "bin" / ep.name
            launcher.write_text(f"#!{Path(py).absolute()}\nimport sys\nfrom {ep.module} import {ep.attr}\n"
                                f"sys.exit({ep.attr}())\n")  # fmt: skip
            launcher.chmod(0o755)
    after = versions(py, PROTECTED)
    moved = [f"{n}: {before[n]} -> {after[n]}" for n in PROTECTED if before[n] != after[n]]
    if moved:
        print(f"install: the image's own packages changed: {'; '.join(moved)}", file=sys.stderr)
        return 1
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    proc = subprocess.run([py, "-c", code, *GPU_MODULES], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"install: a module the GPU check needs does not import:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return 1
    report = {
        "protected": {n: before[n][0] for n in PROTECTED},
        "installed": [Path(c).name for c in chosen],
        "image_kept": kept,
        "assumed_misses": misses,
    }
    (venv / "install_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for m in misses:
        print(f"[install] warning: the image's {m} (a metadata bound; its code may still serve)")
    print(f"[install] {len(chosen)} wheels + slimforge into {venv} in {time.perf_counter() - start:.0f} s over the "
          f"image's packages ({', '.join(f'{n} {before[n][0]}' for n in PROTECTED)}); the image's own kept: "
          f"{', '.join(kept) or 'none'}")  # fmt: skip
    return 0


def image_requirements() -> int:
    """Prints the requirement lines that rebuild the image's share of slimforge's environment elsewhere (for the
    rehearsal): every package of the image list that the tested environment holds (``scripts/constraints.txt``) or
    the tests need, at the image's version where the list gives it, else at the tested one; torch brings its own
    CUDA libraries."""
    image, _ = read_image()
    pins = read_pins()
    for name in sorted(image):
        if name.startswith(("nvidia-", "cuda-")) or name == "triton":
            continue
        if name in pins or name in (
            "onnxruntime",
            "pytest",
            "pluggy",
            "iniconfig",
            "setuptools",
            "wheel",
            "packaging",
            "pip",
        ):
            version = image[name] or pins.get(name)
            print(f"{name}=={version}" if version else name)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("prepare").add_argument("--out", default=str(ROOT / ".gpu_wheels"))
    i = sub.add_parser("install")
    i.add_argument("--wheels", default=str(ROOT / ".gpu_wheels"))
    i.add_argument("--venv", default=str(ROOT / ".gpu_venv"))
    sub.add_parser("image-requirements")
    args = p.parse_args(argv)
    if args.verb == "image-requirements":
        return image_requirements()
    if args.verb == "prepare":
        return prepare(Path(args.out))
    return install(Path(args.wheels), Path(args.venv))


if __name__ == "__main__":
    sys.exit(main())

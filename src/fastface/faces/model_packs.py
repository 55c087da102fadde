"""The ONNX face model packs FastFace can run without the ``insightface`` package, and where to find them.

A pack is one SCRFD detector plus one ArcFace-style recogniser. Sizes and SHA-256 digests are the
Git LFS pointers of the public Hugging Face copies (the same bytes as InsightFace's release zips):

* ``buffalo_l`` (InsightFace): ``det_10g.onnx`` (SCRFD-10GF with keypoints) + ``w600k_r50.onnx``
  (ResNet-50 trained on WebFace600K), hub copy ``public-data/insightface``, ``models/buffalo_l``.
* ``antelopev2`` (InsightFace): ``scrfd_10g_bnkps.onnx`` (byte-identical to ``det_10g.onnx``) +
  ``glintr100.onnx`` (ResNet-100 trained on Glint360K), hub copy ``DIAMONIK7777/antelopev2``.
* ``auraface`` (fal, ``fal/AuraFace-v1``): ``glintr100.onnx`` holding AuraFace's own ResNet-100
  weights (same file name as antelopev2's, different bytes) + InsightFace's ``scrfd_10g_bnkps.onnx``.

Licences: InsightFace's pretrained models are for non-commercial research use only. AuraFace's
recogniser is Apache-2.0; the SCRFD detector in its repository is InsightFace's and keeps
InsightFace's terms.

Resolution order for each file: ``model_dir`` (option) -> ``$FASTFACE_FACE_MODELS`` ->
``~/.insightface/models/<pack>`` (where InsightFace users already have them) -> download from the hub
(``hub_repo`` option or ``$FASTFACE_FACE_HUB_REPO``, else the pack's default), verified against the
size and SHA-256 below. A local directory may hold the files directly or in a ``<pack>/`` (or
``<pack>/<pack>/``, as the antelopev2 zip unpacks) sub-directory.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, MissingWeightsError

ENV_MODEL_DIR = "FASTFACE_FACE_MODELS"
ENV_HUB_REPO = "FASTFACE_FACE_HUB_REPO"
INSIGHTFACE_LICENCE = "InsightFace pretrained models: non-commercial research use only"


@dataclass(frozen=True)
class ModelFile:
    filename: str
    size: int | None  # bytes; None where no public record was found
    sha256: str | None


@dataclass(frozen=True)
class ModelPack:
    name: str
    detector: ModelFile
    recognizer: ModelFile
    hub_repo: str  # default hub copy: "owner/name" or "owner/name/subfolder"
    licence: str
    description: str
    # ArcFace input normalisation (x - mean) / std: 127.5 / 127.5 for networks trained with
    # arcface_torch, which all three recognisers are (InsightFace's ArcFaceONNX would read 0 / 1 only
    # for old MXNet exports whose graphs start with Sub/Mul nodes).
    input_mean: float = 127.5
    input_std: float = 127.5

    @property
    def files(self) -> tuple[ModelFile, ModelFile]:
        return (self.detector, self.recognizer)


_SCRFD_10G = ModelFile("scrfd_10g_bnkps.onnx", 16923827, "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91")

PACKS: dict[str, ModelPack] = {
    "buffalo_l": ModelPack(
        name="buffalo_l",
        detector=ModelFile("det_10g.onnx", 16923827, "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91"),
        recognizer=ModelFile("w600k_r50.onnx", 174383860,
                             "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43"),
        hub_repo="public-data/insightface/models/buffalo_l",
        licence=INSIGHTFACE_LICENCE,
        description="InsightFace buffalo_l: SCRFD-10GF + ArcFace ResNet-50 (WebFace600K)",
    ),
    "antelopev2": ModelPack(
        name="antelopev2",
        detector=_SCRFD_10G,
        recognizer=ModelFile("glintr100.onnx", 260665334,
                             "4ab1d6435d639628a6f3e5008dd4f929edf4c4124b1a7169e1048f9fef534cdf"),
        hub_repo="DIAMONIK7777/antelopev2",
        licence=INSIGHTFACE_LICENCE,
        description="InsightFace antelopev2: SCRFD-10GF + ArcFace ResNet-100 (Glint360K)",
    ),
    "auraface": ModelPack(
        name="auraface",
        detector=_SCRFD_10G,
        recognizer=ModelFile("glintr100.onnx", 260694151,
                             "a7933ea5330113b01c9b60351d8f4c33003f145d8470ac5f0e52ee2effe25c60"),
        hub_repo="fal/AuraFace-v1",
        licence="Apache-2.0 (AuraFace recogniser); its SCRFD detector is InsightFace's: non-commercial research use only",
        description="AuraFace-v1 (fal): ResNet-100 trained on commercially usable data + SCRFD-10GF",
    ),
}
ALIASES = {"arcface": "buffalo_l"}


def get_pack(name: str) -> ModelPack:
    key = ALIASES.get(name, name)
    if key not in PACKS:
        known = ", ".join(sorted([*PACKS, *ALIASES]))
        raise ConfigError(f"unknown face model pack '{name}' (known: {known})")
    return PACKS[key]


def insightface_dir(pack: ModelPack) -> Path:
    return Path("~/.insightface/models").expanduser() / pack.name


def search_roots(pack: ModelPack, model_dir: str | os.PathLike | None = None) -> list[Path]:
    """Local directories searched, in order: ``model_dir``, ``$FASTFACE_FACE_MODELS``, InsightFace's."""
    roots = []
    if model_dir is not None:
        roots.append(Path(model_dir).expanduser())
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(insightface_dir(pack))
    return roots


def search_dirs(pack: ModelPack, model_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every directory looked into: each root, then its ``<pack>/`` and ``<pack>/<pack>/`` sub-directories."""
    dirs: list[Path] = []
    for root in search_roots(pack, model_dir):
        for candidate in (root, root / pack.name, root / pack.name / pack.name):
            if candidate not in dirs:
                dirs.append(candidate)
    return dirs


def find_local(pack: ModelPack, spec: ModelFile, model_dir: str | os.PathLike | None = None) -> Path | None:
    """The first local copy of ``spec``, or None. Never touches the network."""
    for directory in search_dirs(pack, model_dir):
        path = directory / spec.filename
        if path.is_file():
            return path
    return None


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_download(path: Path, spec: ModelFile, source: str) -> None:
    """Check a downloaded file's size and SHA-256; on mismatch delete it and raise.

    Only the size is checked where no public digest is recorded (``spec.sha256`` is None).
    """
    problem = None
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        problem = f"has {size} bytes, expected {spec.size}"
    elif spec.sha256 is not None:
        got = sha256sum(path)
        if got != spec.sha256:
            problem = f"has SHA-256 {got}, expected {spec.sha256}"
    if problem is None:
        return
    _remove_cached(path)
    raise MissingWeightsError(
        f"{spec.filename} downloaded from '{source}' is corrupted or not the expected file ({problem}); "
        f"it was removed, run again to download it afresh"
    )


def _remove_cached(path: Path) -> None:
    """Delete a file; for a hub-cache symlink also the blob it points to (else it would be reused)."""
    target = path.resolve()
    for p in {path, target}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _check_local_size(path: Path, spec: ModelFile, pack: ModelPack) -> None:
    # Local files are the user's: a converted or fine-tuned export is legitimate, so a size that is
    # not the published one only warns (it also catches antelopev2/auraface glintr100.onnx mix-ups).
    if spec.size is not None and path.stat().st_size != spec.size:
        warnings.warn(
            f"{path} has {path.stat().st_size} bytes, not the {spec.size} of the published {pack.name} "
            f"{spec.filename}; using it anyway",
            stacklevel=3,
        )


def split_hub_repo(repo: str, pack: ModelPack) -> tuple[str, str | None]:
    """``owner/name[/subfolder]`` (``{pack}`` is replaced by the pack name) -> (repo id, subfolder)."""
    parts = [p for p in repo.replace("{pack}", pack.name).strip("/").split("/") if p]
    if len(parts) < 2:
        raise ConfigError(f"a face model hub repository must look like 'owner/name[/subfolder]', got '{repo}'")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def hub_source(pack: ModelPack, hub_repo: str | None = None) -> str:
    return hub_repo or os.environ.get(ENV_HUB_REPO) or pack.hub_repo


@dataclass(frozen=True)
class ResolvedPack:
    pack: ModelPack
    detector: Path
    recognizer: Path


def resolve_pack(
    name: str | ModelPack,
    model_dir: str | os.PathLike | None = None,
    hub_repo: str | None = None,
) -> ResolvedPack:
    """Local paths of a pack's two files, downloading (and verifying) what is not found locally.

    Raises :class:`MissingWeightsError` naming the missing files and the directory to put them in
    when they are neither local nor downloadable (e.g. offline).
    """
    pack = name if isinstance(name, ModelPack) else get_pack(name)
    found: dict[str, Path] = {}
    missing: list[ModelFile] = []
    for spec in pack.files:
        local = find_local(pack, spec, model_dir)
        if local is not None:
            _check_local_size(local, spec, pack)
            found[spec.filename] = local
        else:
            missing.append(spec)
    if missing:
        source = hub_source(pack, hub_repo)
        repo_id, subfolder = split_hub_repo(source, pack)
        from ..hub import resolve_file

        for spec in missing:
            try:
                path = resolve_file(repo_id, spec.filename, subfolder=subfolder, what=f"face model pack '{pack.name}'")
            except MissingWeightsError as exc:
                raise _missing_error(pack, missing, model_dir, source, exc) from exc
            verify_download(path, spec, source)
            found[spec.filename] = path
    return ResolvedPack(pack, found[pack.detector.filename], found[pack.recognizer.filename])


def _missing_error(
    pack: ModelPack, missing: list[ModelFile], model_dir: str | os.PathLike | None, source: str, cause: Exception
) -> MissingWeightsError:
    from ..hub import local_only, offline_reason

    target = Path(model_dir).expanduser() if model_dir is not None else insightface_dir(pack)
    names = ", ".join(spec.filename for spec in missing)
    searched = ", ".join(str(d) for d in search_roots(pack, model_dir))
    root = cause.__cause__ or cause
    why = offline_reason() if local_only() else f"the download failed ({type(root).__name__})"
    return MissingWeightsError(
        f"face model pack '{pack.name}' is missing {names}: fetch them with `fastface download --face-pack "
        f"{pack.name}` on a connected machine, or put {names} into {target} or set ${ENV_MODEL_DIR} "
        f"(Python: model_dir=<folder>); searched {searched}; not downloaded from hub repository '{source}': {why}"
    )

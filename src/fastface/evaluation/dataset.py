"""Evaluation datasets: identities (reference photos) and prompts in two splits.

Two layouts read as is:

``fastface`` (docs/PROTOCOL.md)::

    DIR/identities/<identity id>/<photo>...   one folder per identity, one or more photos
    DIR/prompts/realistic.txt                 one prompt per line
    DIR/prompts/stylistic.txt                 "style; content" per line
    DIR/dataset.json                          optional: name, description, sources, licence

``paper`` (the layout published with the FastFace paper)::

    DIR/id_photos/*.png                       one identity per photo (id = file stem)
    DIR/prompts_nostyle.txt                   realistic prompts
    DIR/prompts_style.txt                     stylistic prompts, the style before the ';'

Blank lines and lines starting with ``#`` are ignored in prompt files. Hidden files (a leading
``.``: ``.DS_Store``) inside identity folders are ignored; a hidden identity folder (or a hidden
photo in ``id_photos``) is a problem to fix, as is anything among the photos that is not a regular
file (a FIFO, a socket, a device, a folder). A name too long for a file name gets a shortened id
with a hash of the full name (``safe_id``). Prompt ids are the split
and the line's position among the prompts (``realistic-003``), so appending prompts keeps the ids
(and hence the seeds) of the earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError

SPLITS = ("realistic", "stylistic")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
# Ids become parts of file names ("<id>__<prompt>__<seed>.png", ".tmp-<id>...<scorer>.<pid>.json"),
# which must stay under the usual 255-byte limit of a name; longer ids are cut and given a hash.
MAX_ID_LENGTH = 120
SMOKE_PROMPTS = Path(__file__).with_name("smoke")


@dataclass(frozen=True)
class Prompt:
    """One prompt; ``text`` is what the generator gets, ``style`` is scored alone on the face crop."""

    id: str
    split: str
    text: str
    content: str
    style: str | None = None


@dataclass(frozen=True)
class IdentityEntry:
    """One person: an id that is safe in file names, and the reference photos (sorted)."""

    id: str
    photos: tuple[Path, ...]
    name: str = ""  # the folder or file name as found, when the id had to be made safe

    def split_photos(self, reference_photos: int) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        """(photos that condition the generation, held-out photos for the copy-paste index)."""
        k = max(1, min(int(reference_photos), len(self.photos)))
        return self.photos[:k], self.photos[k:]


@dataclass
class Dataset:
    root: Path
    layout: str
    identities: list[IdentityEntry]
    prompts: dict[str, list[Prompt]]
    issues: list[str] = field(default_factory=list)  # structural problems found while reading
    meta: dict = field(default_factory=dict)

    def identity(self, identity_id: str) -> IdentityEntry:
        for entry in self.identities:
            if entry.id == identity_id:
                return entry
        raise InputError(f"identity '{identity_id}' is not in the dataset at {self.root}")

    def select_prompts(self, split: str = "all", limit: int | None = None) -> list[Prompt]:
        """The prompts of ``split`` ("realistic", "stylistic" or "all"), the first ``limit`` of each split."""
        if split not in (*SPLITS, "all"):
            raise ConfigError(f"unknown split '{split}'; choose realistic, stylistic or all")
        chosen = SPLITS if split == "all" else (split,)
        out: list[Prompt] = []
        for name in chosen:
            prompts = self.prompts.get(name, [])
            out.extend(prompts if limit is None else prompts[: max(0, int(limit))])
        return out

    def prompt(self, prompt_id: str) -> Prompt:
        for prompts in self.prompts.values():
            for p in prompts:
                if p.id == prompt_id:
                    return p
        raise InputError(f"prompt '{prompt_id}' is not in the dataset at {self.root}")

    def fingerprint(self) -> str:
        """sha256 over every photo's bytes and every prompt: equal data, equal fingerprint, any layout."""
        digest = hashlib.sha256()
        for entry in self.identities:
            digest.update(f"identity\0{entry.id}\0".encode())
            for photo in entry.photos:
                digest.update(f"photo\0{photo.name}\0{file_sha256(photo)}\0".encode())
        for split in SPLITS:
            for p in self.prompts.get(split, []):
                digest.update(f"prompt\0{p.id}\0{p.text}\0{p.style or ''}\0".encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "identities": len(self.identities),
            "photos": sum(len(e.photos) for e in self.identities),
            "prompts": {split: len(self.prompts.get(split, [])) for split in SPLITS},
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_id(name: str) -> str:
    """A file-name-safe identity id: runs of other characters become '_'; an id longer than
    ``MAX_ID_LENGTH`` is cut and ends with 12 hex digits of the sha256 of the full name, unique."""
    cleaned = _SAFE_ID.sub("_", name).strip("._") or "identity"
    if len(cleaned) > MAX_ID_LENGTH:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        cleaned = f"{cleaned[:MAX_ID_LENGTH - 13].rstrip('._-')}-{digest}"
    return cleaned


def _read_prompt_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 text ({exc.reason})") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse_prompts(lines: Sequence[str], split: str, issues: list[str], source: str) -> list[Prompt]:
    """Prompts of one split; a stylistic line without ';' is an issue (its style cannot be scored)."""
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for index, line in enumerate(lines):
        prompt_id = f"{split}-{index:03d}"
        if line in seen:
            issues.append(f"{source}: prompt {index + 1} repeats prompt {seen[line] + 1}: '{line}'")
        seen.setdefault(line, index)
        if split == "stylistic":
            if ";" not in line:
                issues.append(f"{source}: stylistic prompt {index + 1} has no ';' separating style and content: '{line}'")
                out.append(Prompt(prompt_id, split, line, line, None))
                continue
            style, content = (part.strip() for part in line.split(";", 1))
            if not style or not content:
                issues.append(f"{source}: stylistic prompt {index + 1} has an empty style or content: '{line}'")
            # The generator sees the line as written, with the separator made a comma.
            text = ", ".join(part for part in (style, content) if part)
            out.append(Prompt(prompt_id, split, text, content, style))
        else:
            out.append(Prompt(prompt_id, split, line, line, None))
    return out


def _photos_in(folder: Path, issues: list[str], root: Path, report_hidden: bool = False) -> list[Path]:
    """The regular files of ``folder``; anything else there is an issue (never skipped without a word)."""
    photos = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            if report_hidden and path.suffix.lower() in PHOTO_SUFFIXES and not path.name.startswith("._"):
                issues.append(f"{path.relative_to(root)} is hidden (its name starts with '.'): rename it to use it, "
                              "or remove it")
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            issues.append(f"{path.relative_to(root)} cannot be read ({exc.strerror or exc})")
            continue
        if stat.S_ISREG(mode):
            photos.append(path)
        else:
            from ..faces.io import special_file_kind

            kind = "a folder" if stat.S_ISDIR(mode) else special_file_kind(mode) or "not a regular file"
            issues.append(f"{path.relative_to(root)} is {kind}, not a photo file")
    return photos


def _register(entries: list[IdentityEntry], issues: list[str], name: str, photos: list[Path]) -> None:
    ident = safe_id(name)
    for other in entries:
        # Case-insensitive, because image file names built from ids collide on such file systems.
        if other.id.lower() == ident.lower():
            issues.append(f"duplicate identity id '{ident}': '{other.name}' and '{name}'")
            return
    entries.append(IdentityEntry(ident, tuple(photos), name))


def detect_layout(root: Path) -> str:
    if (root / "identities").is_dir():
        return "fastface"
    if (root / "id_photos").is_dir():
        return "paper"
    raise InputError(
        f"{root} is not an evaluation dataset: expected identities/<id>/<photos> with prompts/realistic.txt "
        "and prompts/stylistic.txt, or the paper's id_photos/*.png with prompts_nostyle.txt and prompts_style.txt"
    )


def load_dataset(root: str | Path) -> Dataset:
    """Read a dataset in either layout. Structural problems are collected in ``Dataset.issues``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist")
    layout = detect_layout(root)
    issues: list[str] = []
    entries: list[IdentityEntry] = []
    if layout == "fastface":
        folders = sorted((root / "identities").iterdir())
        for folder in folders:
            if folder.name.startswith("."):
                if folder.is_dir():  # hidden files (.DS_Store) are the system's; a hidden folder is a person left out
                    issues.append(f"identities/{folder.name} is hidden (its name starts with '.'): rename it to "
                                  "use it as an identity, or move it out of identities/")
                continue
            if not folder.is_dir():
                issues.append(f"identities/{folder.name} is a file; each identity is a folder of photos")
                continue
            photos = _photos_in(folder, issues, root)
            if not photos:
                issues.append(f"identity '{folder.name}' has no photos")
                continue
            _register(entries, issues, folder.name, photos)
        prompt_files = {"realistic": root / "prompts" / "realistic.txt", "stylistic": root / "prompts" / "stylistic.txt"}
    else:
        for photo in _photos_in(root / "id_photos", issues, root, report_hidden=True):
            _register(entries, issues, photo.stem, [photo])
        prompt_files = {"realistic": root / "prompts_nostyle.txt", "stylistic": root / "prompts_style.txt"}
    if not entries:
        issues.append("the dataset has no identities")
    prompts: dict[str, list[Prompt]] = {}
    for split, path in prompt_files.items():
        rel = path.relative_to(root)
        if not path.is_file():
            issues.append(f"{rel} is missing (the {split} split)")
            prompts[split] = []
            continue
        prompts[split] = parse_prompts(_read_prompt_lines(path), split, issues, str(rel))
        if not prompts[split]:
            issues.append(f"the {split} split is empty ({rel} holds no prompt)")
    meta: dict = {}
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            issues.append(f"dataset.json is not valid JSON ({exc})")
    return Dataset(root=root, layout=layout, identities=entries, prompts=prompts, issues=issues, meta=meta)


def check_dataset(root: str | Path, face_backend: str = "dlib", progress: bool = True) -> tuple[Dataset, list[str]]:
    """Every problem with a dataset: structural ones plus unreadable photos, photos without a face,
    and the same photo filed under two identities. An empty list means the dataset is valid."""
    from tqdm.auto import tqdm

    from .. import faces
    from ..errors import NoFaceError

    dataset = load_dataset(root)
    problems = list(dataset.issues)
    backend = faces.get_backend(face_backend)
    owners: dict[str, str] = {}
    photos = [(entry, photo) for entry in dataset.identities for photo in entry.photos]
    for entry, photo in tqdm(photos, desc="checking photos", unit="photo", disable=not progress):
        rel = photo.relative_to(dataset.root)
        digest = file_sha256(photo)
        if digest in owners and owners[digest] != entry.id:
            problems.append(f"{rel}: the same file is also a photo of identity '{owners[digest]}'")
        owners.setdefault(digest, entry.id)
        try:
            image = faces.load_image(photo)
        except InputError as exc:
            problems.append(f"{rel}: unreadable photo ({exc})")
            continue
        try:
            faces.analyze(image, backend)
        except NoFaceError:
            problems.append(f"{rel}: no face found (backend {face_backend})")
    return dataset, problems


# --- the bundled smoke set ---------------------------------------------------------------------

def _smoke_portraits() -> dict[str, tuple[object, str]]:
    """The public-domain portraits that ship inside installed packages, with where they come from."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data
        from matplotlib import cbook
    except ImportError as exc:
        raise InputError(
            f"the smoke set takes its portraits from scikit-image and matplotlib: install them ({exc.name} is missing)"
        ) from exc
    astronaut = Image.fromarray(np.asarray(skimage.data.astronaut()))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        hopper = img.convert("RGB")
    return {
        "astronaut": (astronaut, "scikit-image skimage.data.astronaut(): NASA portrait of Eileen Collins, public domain"),
        "grace-hopper": (hopper, "matplotlib sample_data/grace_hopper.jpg: US Navy portrait of Grace Hopper, public domain"),
    }


# Crops in fractions of width/height. The astronaut photo holds a second face-like patch (the
# flag), so each of its crops keeps the portrait alone; the last crop of each is a tight one, which
# with the default of one conditioning photo is held out for the copy-paste index.
_SMOKE_VARIANTS = {
    "astronaut": [("01-portrait", (0.08, 0.0, 0.78, 0.62), False), ("02-mirrored", (0.08, 0.0, 0.78, 0.62), True),
                  ("03-close", (0.22, 0.04, 0.64, 0.46), False)],
    "grace-hopper": [("01-portrait", (0.0, 0.0, 1.0, 1.0), False), ("02-mirrored", (0.0, 0.0, 1.0, 1.0), True),
                     ("03-close", (0.2, 0.12, 0.84, 0.66), False)],
}


def write_smoke_dataset(root: str | Path, overwrite: bool = False) -> Dataset:
    """Write the offline smoke set (2 identities x 3 photos, 34 + 34 prompts) into ``root``."""
    from PIL import ImageOps

    root = Path(root).expanduser()
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise InputError(f"{root} exists and is not empty; choose an empty folder (or --overwrite)")
    portraits = _smoke_portraits()
    sources = {}
    for ident, (image, source) in portraits.items():
        folder = root / "identities" / ident
        folder.mkdir(parents=True, exist_ok=True)
        w, h = image.size
        for name, (x0, y0, x1, y1), mirror in _SMOKE_VARIANTS[ident]:
            crop = image.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
            if mirror:
                crop = ImageOps.mirror(crop)
            crop.save(folder / f"{name}.png")
        sources[ident] = source
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (root / "prompts" / f"{split}.txt").write_text(
            (SMOKE_PROMPTS / f"{split}.txt").read_text(encoding="utf-8"), encoding="utf-8")
    meta = {
        "name": "fastface-smoke",
        "description": "Offline smoke set of the FastFace evaluation protocol: public-domain portraits "
                       "shipped by scikit-image and matplotlib, with crops and mirror images as extra photos.",
        "sources": sources,
        "prompts": "written for FastFace (realistic: photographic scenes; stylistic: 'style; content')",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return load_dataset(root)

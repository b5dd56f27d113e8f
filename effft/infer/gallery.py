"""`effft enroll`, `effft identify` and `effft verify`: an embedding run applied to people.

A gallery (`.npz`, read with `allow_pickle=False`) holds, for each enrolled person, the mean of
the L2-normalised embeddings of their photos, normalised again (their template), and each
photo's embedding and path; and the run it was made with: a fingerprint of the run's weights,
the model, the embedding length, and the run's open-set threshold (chosen on val at a false-alarm
rate of 1e-2). A gallery is only used with the run that made it.

- enroll: `people/<name>/*.jpg`; with `--update` the people of the folder are added or replaced
  and everyone else's arrays are copied as they were (byte for byte). The file is written under
  a temporary name and renamed, so a gallery is never half written.
- identify: each photo's best person, its similarity and the runner-up; `unknown` under the
  threshold, `no_face` where the run detects faces and none was found, `unreadable` for files
  that cannot be read (the reason in the `error` column).
- verify: the similarity of two photos and whether it reaches the run's verification threshold.

Photos are read as the run's training read them (the largest face, cropped with its margin).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..console import console
from ..errors import EffftError
from ..paths import atomic_write
from .loaded_run import LoadedRun, find_images, load_run

log = logging.getLogger(__name__)

BATCH = 32
OPEN_SET = ("open_set_k5", "open_set_k1")  # the gallery's threshold: enrolled from several photos, else one
IDENTIFY_COLUMNS = ("path", "identity", "similarity", "best_match", "runner_up", "runner_up_similarity", "error")
UNKNOWN, NO_FACE, UNREADABLE = "unknown", "no_face", "unreadable"


# ----------------------------------------------------------------------------- the run


def embedding_run(target: Path) -> LoadedRun:
    """The embedding run at `target`, in eval mode; a classifier is refused, naming the file."""
    run = load_run(Path(target))
    if not run.is_embedding:
        raise EffftError(f"{run.ckpt} is a classifier ({run.task}), not an embedding run: train one with task: "
                         "embedding (e.g. recipes/face_embedding_b0.yaml) to enrol, identify and verify people")
    return run


def fingerprint(run: LoadedRun) -> str:
    """A hash of the run's weights: a gallery made with other weights is refused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(run.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read(run: LoadedRun, path: Path) -> tuple[np.ndarray | None, str | None]:
    """(image, None), or (None, the reason: no_face / unreadable ...) for a photo."""
    from ..data.decode import BadImageError

    try:
        image, face = run.read(path)
    except BadImageError as exc:
        return None, f"{UNREADABLE}: {exc.reason}"
    if face is False:
        return None, NO_FACE
    return image, None


@torch.no_grad()
def _embed(run: LoadedRun, images: list[np.ndarray]) -> np.ndarray:
    from ..data.transforms import apply

    pipeline = run.eval_pipeline()
    out = []
    for start in range(0, len(images), BATCH):
        batch = torch.stack([apply(pipeline, image, run.in_chans) for image in images[start:start + BATCH]])
        out.append(run.embed(batch).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _template(embeddings: np.ndarray) -> np.ndarray:
    mean = embeddings.mean(0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- the gallery


@dataclass
class Gallery:
    """Enrolled people (sorted by name) and the run they were enrolled with (module docstring)."""

    names: list[str]
    templates: np.ndarray  # (people, dim) float32
    photos: np.ndarray  # (photos, dim) float32
    photo_person: np.ndarray  # (photos,) index into names
    photo_paths: list[str]
    run: str
    model: str
    dim: int
    threshold: float

    def arrays(self) -> dict[str, np.ndarray]:
        return {"names": np.array(self.names, dtype=str), "templates": self.templates, "photos": self.photos,
                "photo_person": self.photo_person.astype(np.int64), "photo_paths": np.array(self.photo_paths, dtype=str),
                "run": np.array(self.run), "model": np.array(self.model), "dim": np.array(self.dim),
                "threshold": np.array(self.threshold, dtype=np.float64)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **self.arrays())


def load_gallery(path: Path, run: LoadedRun) -> Gallery:
    """The gallery at `path`, checked to be one this run made."""
    try:
        with np.load(path, allow_pickle=False) as f:
            g = Gallery(names=[str(n) for n in f["names"]], templates=f["templates"], photos=f["photos"],
                        photo_person=f["photo_person"], photo_paths=[str(p) for p in f["photo_paths"]],
                        run=str(f["run"]), model=str(f["model"]), dim=int(f["dim"]), threshold=float(f["threshold"]))
    except FileNotFoundError:
        raise EffftError(f"gallery {path} does not exist: make it with effft enroll RUN people/ --out {path}") from None
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise EffftError(f"{path} is not a gallery written by effft enroll ({exc}); enrol again") from None
    dim = int(run.embed(torch.zeros(1, run.in_chans, run.spec.size, run.spec.size)).shape[1])
    if g.model != str(run.model.name) or g.dim != dim or g.run != fingerprint(run):
        raise EffftError(f"gallery {path} was enrolled with another run (model {g.model}, embedding of {g.dim}) than "
                         f"{run.ckpt} (model {run.model.name}, embedding of {dim}): embeddings of two runs cannot "
                         "be compared; enrol the people again with this run (effft enroll)")
    return g


def _people(folder: Path) -> dict[str, list[Path]]:
    from ..data.sources._common import files_under, subfolders
    from ..data.sources.folder import image_file

    if not folder.is_dir():
        raise EffftError(f"{folder} is not a folder: give a folder holding one sub-folder of photos per person, "
                         f"e.g. {folder}/alice/1.jpg")
    people = {d.name: files_under(d, image_file)[0] for d in subfolders(folder)}
    if not people:
        raise EffftError(f"{folder} holds no person folders: put each person's photos in a sub-folder named after "
                         f"them, e.g. {folder}/alice/1.jpg")
    for name, files in people.items():
        if not files:
            raise EffftError(f"person folder {folder / name} holds no images: add photos of {name}, or remove the "
                             "folder; nothing was written")
    return people


def enroll(target: Path, folder: Path, *, out: Path, update: bool = False) -> Gallery:
    """Enrol every person of `folder` (`<name>/*.jpg`) into the gallery `out`; with `update`,
    into the gallery there, the others kept as they were. Nothing is written unless every photo
    was read and had a face."""
    from ..runs.layout import check_output, checkpoint_path

    out, folder = Path(out), Path(folder)
    people = _people(folder)
    check_output(out, flag="--out", inputs=[checkpoint_path(Path(target)), *(p for fs in people.values() for p in fs)],
                 example="gallery.npz")
    if out.exists() and not update:
        raise EffftError(f"--out {out} exists: pass --update to add or replace people in it, or give another file")
    run = embedding_run(target)
    old = load_gallery(out, run) if update and out.exists() else None
    threshold = next((run.operating[k] for k in OPEN_SET if np.isfinite(run.operating.get(k, np.nan))), np.nan)
    enrolled: dict[str, tuple[np.ndarray, list[str]]] = {}
    for name, files in people.items():
        images = []
        for path in files:
            image, problem = _read(run, path)
            if problem is not None:
                what = "no face was found in it" if problem == NO_FACE else problem
                raise EffftError(f"cannot enrol {path}: {what}; replace it with a clear frontal photo of {name}, or "
                                 "remove it; nothing was written")
            images.append(image)
        enrolled[name] = (_embed(run, images), [str(p) for p in files])
    gallery = _merge(old, enrolled, run=fingerprint(run), model=str(run.model.name), threshold=float(threshold))
    gallery.save(out)
    kept = len(gallery.names) - len(enrolled)
    console.print(f"enrolled {len(enrolled)} people ({sum(len(p) for _, p in enrolled.values())} photos) into {out}"
                  + (f"; {kept} others kept as they were" if kept else ""), highlight=False, markup=False)
    return gallery


def _merge(old: Gallery | None, enrolled: dict[str, tuple[np.ndarray, list[str]]], *, run: str, model: str,
           threshold: float) -> Gallery:
    """A gallery of `old`'s people (their arrays copied as they are) and the `enrolled` ones
    (new, or replacing theirs), sorted by name."""
    rows: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}  # name -> (template, photos, paths)
    if old is not None:
        for i, name in enumerate(old.names):
            mine = old.photo_person == i
            rows[name] = (old.templates[i], old.photos[mine], [p for p, m in zip(old.photo_paths, mine) if m])
    for name, (embeddings, paths) in enrolled.items():
        rows[name] = (_template(embeddings), embeddings.astype(np.float32), paths)
    names = sorted(rows)
    dim = int(rows[names[0]][0].shape[0])
    return Gallery(names=names, templates=np.stack([rows[n][0] for n in names]).astype(np.float32),
                   photos=np.concatenate([rows[n][1] for n in names]).astype(np.float32).reshape(-1, dim),
                   photo_person=np.concatenate([np.full(len(rows[n][1]), i) for i, n in enumerate(names)]),
                   photo_paths=[p for n in names for p in rows[n][2]], run=run, model=model, dim=dim,
                   threshold=threshold)


# ----------------------------------------------------------------------------- identify and verify


def identify(target: Path, gallery_path: Path, paths: Sequence[str | Path], *, out: Path) -> list[dict[str, str]]:
    """Name the person of each photo under `paths` from the gallery; rows written to the CSV `out`."""
    from ..runs.layout import check_output, checkpoint_path

    files = find_images(paths)
    check_output(Path(out), flag="--out", inputs=[*files, Path(gallery_path), checkpoint_path(Path(target))],
                 example="ids.csv")
    run = embedding_run(target)
    gallery = load_gallery(Path(gallery_path), run)
    rows: list[dict[str, str]] = []
    images, where = [], []
    for path in files:
        image, problem = _read(run, path)
        row = dict.fromkeys(IDENTIFY_COLUMNS, "")
        row["path"] = str(path)
        if problem is not None:
            row["identity"] = problem.split(":")[0]
            row["error"] = problem.partition(": ")[2] if problem != NO_FACE else "no face found"
        else:
            images.append(image)
            where.append(len(rows))
        rows.append(row)
    if images:
        sims = _embed(run, images) @ gallery.templates.T
        order = np.argsort(-sims, axis=1, kind="stable")
        for r, s, o in zip(where, sims, order):
            best = float(s[o[0]])
            rows[r].update(identity=gallery.names[o[0]] if best >= gallery.threshold else UNKNOWN,
                           similarity=f"{best:.6f}", best_match=gallery.names[o[0]])
            if len(o) > 1:
                rows[r].update(runner_up=gallery.names[o[1]], runner_up_similarity=f"{float(s[o[1]]):.6f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(out)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(IDENTIFY_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    named = sum(r["identity"] not in ("", UNKNOWN, NO_FACE, UNREADABLE) for r in rows)
    console.print(f"identified {named} of {len(rows)} photos against {len(gallery.names)} people (threshold "
                  f"{gallery.threshold:.4g}) -> {out}", highlight=False, markup=False)
    return rows


def verify(target: Path, a: Path, b: Path) -> tuple[float, bool]:
    """The similarity of the faces of two photos, and whether it reaches the run's threshold."""
    run = embedding_run(target)
    images = []
    for path in (Path(a), Path(b)):
        if not path.is_file():
            raise EffftError(f"{path} does not exist: give two image files")
        image, problem = _read(run, path)
        if problem is not None:
            raise EffftError(f"cannot verify with {path}: " + ("no face was found in it" if problem == NO_FACE
                                                                else problem) + "; give a clear frontal photo")
        images.append(image)
    e = _embed(run, images)
    similarity, threshold = float(e[0] @ e[1]), run.operating.get("verification", float("nan"))
    same = bool(similarity >= threshold)
    console.print(f"similarity {similarity:.4f}, threshold {threshold:.4f} (chosen on val): "
                  f"{'same person' if same else 'different people'}", highlight=False, markup=False)
    return similarity, same

"""The `folder` adapter: one sub-folder per class, or `train/`, `val/`, `test/` each holding them.

    root/<class>/**/<image>                 a single pool, split later by `data.split`
    root/{train,val,test}/<class>/**/<image>  a ready split, kept as it is

Class names are the folder names, sorted. Images may sit in nested folders and have any
supported suffix in any case (.jpg, .JPG, .jpeg, .png, ...); other files (notes, thumbnails
databases, hidden files) are ignored without a word.

An empty class folder is an error, not a warning: dropping the class silently would change
the number of outputs of the model, and the usual cause (images of a type we do not read,
such as .heic, or a copy that did not finish) is something the user wants to hear about.
The exception is a ready split whose `val/` or `test/` lacks a class the `train/` folder has:
small data sets often have no example of a rare class in one split, so that is logged as a
warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ...errors import EffftError
from ..decode import IMAGE_SUFFIXES, is_image_file
from ._common import SPLIT_ALIASES, FileSource, Item, Source, files_under, subfolders, task_of

log = logging.getLogger(__name__)


class Options(BaseModel):
    """Keys of `data.folder`."""

    model_config = ConfigDict(extra="forbid")

    ready_split: bool = True
    """Read `root/train`, `root/val`, `root/test` as a ready split (false: as class folders)."""


# Photo formats effft cannot decode: their files are listed among the images so the scan reports
# each one by path as unreadable, instead of passing over them as if they were notes.
UNSUPPORTED_PHOTO_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".psd",
                                        ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2"})


def image_file(path: Path) -> bool:
    """An image effft reads, or a photo of a format it cannot: the scan names the latter (and
    broken links) by path as unreadable, instead of passing over them as if they were notes."""
    return is_image_file(path) or path.suffix.lower() in UNSUPPORTED_PHOTO_SUFFIXES


def _images(folder: Path) -> tuple[list[Path], int]:
    """The image files under `folder` (sorted, recursive), and how many other files it holds."""
    return files_under(folder, image_file)


def _empty_class_message(folder: Path, others: int) -> str:
    what = (f"it holds {others} file(s), none of a supported image type" if others
            else "it is empty")
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    return (f"class folder {folder} has no images ({what}; supported: {kinds}). "
            "Add images to it, convert them to a supported type, or remove the folder.")


def _is_ready_split(root: Path, dirs: list[Path]) -> bool:
    names = {d.name.lower() for d in dirs}
    return bool(names) and names <= set(SPLIT_ALIASES) and "train" in {SPLIT_ALIASES[n] for n in names}


def load(root: Path, options: Options, *, channels: int) -> Source:
    """Items from `root/<class>/...` or `root/{train,val,test}/<class>/...`."""
    root = Path(root).expanduser()
    if not root.exists():
        raise EffftError(f"data folder {root} does not exist: set data.root to the folder "
                         "that holds one sub-folder per class")
    if not root.is_dir():
        raise EffftError(f"data.root {root} is a file, but the folder adapter needs a folder "
                         "with one sub-folder per class (for a CSV use adapter: csv)")
    dirs = subfolders(root)
    loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        log.warning("%d image(s) directly in %s are not in a class folder and are ignored "
                    "(e.g. %s)", len(loose), root, loose[0].name)
    if options.ready_split and _is_ready_split(root, dirs):
        return _load_ready_split(root, dirs)
    class_dirs = _check_classes(root, dirs)
    items = []
    for index, d in enumerate(class_dirs):
        images, others = _images(d)
        if not images:
            raise EffftError(_empty_class_message(d, others))
        items += [Item(path=str(p), target=index) for p in images]
    return _source(root, [d.name for d in class_dirs], items)


def _check_classes(root: Path, dirs: list[Path], where: str = "") -> list[Path]:
    if not dirs:
        raise EffftError(f"{where or root} has no class folders: put the images of each class "
                         f"in a sub-folder named after it, e.g. {root}/cat/1.jpg, "
                         f"{root}/dog/2.jpg")
    if len(dirs) == 1:
        raise EffftError(f"{where or root} has one class folder ({dirs[0].name}); a classifier "
                         "needs at least two classes: add a folder of images for each other "
                         "class")
    return dirs


def _load_ready_split(root: Path, dirs: list[Path]) -> Source:
    by_split: dict[str, list[Path]] = {}
    for d in dirs:
        split = SPLIT_ALIASES[d.name.lower()]
        if split in by_split:
            raise EffftError(f"{root} has two folders for the {split} split "
                             f"({by_split[split][0].parent.name} and {d.name}): keep one")
        by_split[split] = subfolders(d)
    train_dirs = _check_classes(root, by_split["train"], where=str(root / "train"))
    classes = [d.name for d in train_dirs]
    for split, class_dirs in by_split.items():
        extra = sorted({d.name for d in class_dirs} - set(classes))
        if extra:
            raise EffftError(f"{root}/{split} has class folder(s) {extra} that {root}/train "
                             "lacks: every class needs training images")
    items = []
    for split, class_dirs in by_split.items():
        for d in class_dirs:
            images, others = _images(d)
            if not images:
                if split == "train":
                    raise EffftError(_empty_class_message(d, others))
                log.warning("%s has no images: the %s split has no example of class %r",
                            d, split, d.name)
            items += [Item(path=str(p), target=classes.index(d.name), split=split)
                      for p in images]
    log.info("%s: ready split %s", root, ", ".join(sorted(by_split)))
    return _source(root, classes, items)


def _source(root: Path, classes: list[str], items: list[Item]) -> FileSource:
    return FileSource(items=items, classes=classes, task=task_of(classes))

"""Recipes: YAML in user words -> a validated `Recipe`.

Everything is checked before any work starts. A problem ends in one `RecipeError` that names
the key path (`data.augment.train[2].RandomResizedCrop.size`), the value, what is allowed and,
for a misspelt key, the closest valid one. YAML is read with a safe loader: plain data only.
"""

from __future__ import annotations

import codecs
import copy
import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from . import trainer as trainer_args
from .schema import LOGGERS, Recipe
from .space import Param, check_entry, default_space


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-"):  # pydantic's names for validator steps
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (for a close match to a misspelt key)."""
    model: Any = Recipe
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
    return list(getattr(model, "model_fields", {}) or {})


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    where = _format_loc(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}? " if close else ""
        return f"{where}: unknown key. {hint}Allowed here: {', '.join(allowed)}"
    if loc == ("trainer",) and re.match(r"\w+: ", error["msg"].removeprefix("Value error, ")):
        # config/trainer.py lists its problems one `key: why` a line
        return "\n  ".join(f"trainer.{line}" for line in error["msg"].removeprefix("Value error, ").splitlines())
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    bad_arg = re.match(r"(\w+): bad argument '(\w+)'", msg)  # an augmentation's argument
    if bad_arg:
        where += f".{bad_arg[1]}.{bad_arg[2]}"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{where}: {msg}{shown}"


def validate(raw: dict[str, Any], *, source: str = "recipe") -> Recipe:
    """A `Recipe` from plain data, or one RecipeError listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections (name, model, data, ...), "
                          f"got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise RecipeError(f"{source} is not a valid recipe:\n  " + "\n  ".join(lines)) from None
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a validator's own error type (UnknownModelError ...)
        if hasattr(exc, "exit_code"):
            raise RecipeError(f"{source}: {exc}") from None
        raise


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (["key", "path"], value typed as YAML would type it)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise RecipeError(f"--set {text!r}: expected key.path=value, e.g. --set data.batch_size=64")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _schema_type(path: list[str]) -> Any:
    """The annotation of the recipe field at `path` (None where the schema does not say)."""
    if len(path) == 2 and path[0] == "trainer":
        return trainer_args.annotation(path[1])
    model: Any = Recipe
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")),
                     annotation)
    return annotation


def _typed(path: list[str], text: str, parsed: Any) -> Any:
    """An override's value as the schema wants it: text stays text where the field is a string or a
    path (`--set name=2024`), and a number in e notation is a number (YAML 1.1 reads 1e-4 as text)."""
    annotation = _schema_type(path)
    options = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    classes = tuple(c for c in (get_origin(t) or t for t in options) if isinstance(c, type) and c is not Any)
    if options & {str, Path} and not isinstance(parsed, classes):
        return text
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()) and (float in options or not options & {str, Path}):
        return float(parsed)
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.path=value` of `overrides` in `raw` (in place), typed by the schema."""
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_key(raw, path, _typed(path, text.partition("=")[2], value))
        except RecipeError as exc:
            raise RecipeError(f"--set {text!r}: {exc}") from None
    return raw


def set_key(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set the key at `path` (its parts) in the plain recipe `raw`, making missing sections."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{'.'.join(path[:i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, nothing executed) that refuses a key given twice in one
    mapping: PyYAML would keep the last silently, and a second `data:` section would replace the
    first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:  # a list as a key: PyYAML's own check below names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (also at line {seen[key].line + 1}): keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kB; more is a data file given by mistake
MAX_RECIPE_VALUES = 10_000  # values of the document with every alias (*name) written out


def _read_text(path: Path) -> str:
    """The recipe file as text: UTF-8 (with or without a byte-order mark), at most a megabyte."""
    try:
        with open(path, "rb") as f:  # read at most a little over the limit: `effft fit /dev/zero` ends
            data = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: more than {MAX_RECIPE_BYTES >> 20} MB, not a recipe (a recipe is a small YAML "
                          "text file): check the path")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise RecipeError(f"{path}: the recipe is UTF-16 or UTF-32 text: save it as UTF-8 (in PowerShell, "
                          "Out-File -Encoding utf8; in an editor, 'Save with encoding: UTF-8')")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start + 1}, line {line}): a recipe is a YAML text "
                          "file; check the path, or save it as UTF-8") from None
    if "\x00" in text:
        raise RecipeError(f"{path}: not a text file (it holds NUL bytes, as UTF-16 text and binary files do): a "
                          "recipe is a YAML text file in UTF-8; check the path, or save it as UTF-8")
    return text


def _expanded_size(node: yaml.Node, sizes: dict[int, int], path: Path, open_: set[int] | None = None) -> int:
    """How many values `node` holds once every alias in it is written out. An alias is the
    anchored node itself, so the sizes are counted once per node: a few nested aliases can stand
    for millions of values ("billion laughs"), which validating and saving the recipe would
    build."""
    if id(node) in sizes:
        return sizes[id(node)]
    open_ = open_ if open_ is not None else set()
    if id(node) in open_:
        raise RecipeError(f"{path}: the value at line {node.start_mark.line + 1} holds itself through an alias: "
                          "a recipe is plain data; write the values out")
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, path, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, path, open_) + _expanded_size(v, sizes, path, open_)
                    for k, v in node.value)
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


def _check_size(root: yaml.Node, path: Path) -> None:
    sizes: dict[int, int] = {}
    if _expanded_size(root, sizes, path) <= MAX_RECIPE_VALUES:
        return
    node = root  # the innermost value that is too large alone: where the aliases multiply
    while True:
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else []
        big = next((c for c in children if sizes[id(c)] > MAX_RECIPE_VALUES), None)
        if big is None:
            break
        node = big
    raise RecipeError(f"{path}: the value at line {node.start_mark.line + 1} holds {sizes[id(node)]:,} values once "
                      f"its aliases (*name) are written out, more than the {MAX_RECIPE_VALUES:,} a recipe may hold: "
                      "use fewer aliases, or write the values out")


def read_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        loader = _UniqueKeyLoader(text)  # yaml.load's steps, with the size checked before the values are built
        try:
            root = loader.get_single_node()
            if root is None:
                return {}
            _check_size(root, path)
            raw = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: values nested too deep for a recipe") from None
    return raw if raw is not None else {}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`--set`) and validate a recipe file."""
    raw = read_yaml(Path(path))
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    recipe = validate(raw, source=str(path))
    check_paths(recipe, source=str(path))
    check_places(recipe, source=str(path))
    check_loggers(recipe, source=str(path))
    return recipe


def check_places(recipe: Recipe, *, source: str) -> None:
    """The run directory and the image cache must lie apart from the data: a run written into
    data.root would be read as data by the next run (its report PNGs as a class), and `--overwrite`
    of a run directory that holds the data would delete them."""
    root, run_dir = recipe.data.root.resolve(), recipe.run_dir.resolve()
    data = recipe.data
    # adapters that take every image under data.root would read a run written there as data;
    # a MedMNIST file or a CSV reads only what it names
    walks = data.adapter in ("folder", "face") or (data.adapter == "dicom" and not getattr(data.options, "csv", None))
    if (walks and run_dir.is_relative_to(root)) or root.is_relative_to(run_dir):
        raise RecipeError(f"{source}: the run directory {recipe.run_dir} (output_dir/name) and data.root {recipe.data.root} "
                          "overlap: the run would write into the data, and --overwrite would delete them; choose "
                          "another output_dir or name")
    if recipe.data.cache == "disk" and recipe.data.cache_dir is not None and \
            recipe.data.cache_dir.resolve().is_relative_to(root):
        raise RecipeError(f"{source}: data.cache_dir {recipe.data.cache_dir} is inside data.root {recipe.data.root}: "
                          "the cache would be read as data; choose a folder outside it")


def check_loggers(recipe: Recipe, *, source: str) -> None:
    """The optional packages of the recipe's loggers must be installed before anything starts
    (not when the recipe is validated: `effft test` re-reads a run's recipe, and logs nothing)."""
    import importlib.util

    for name in recipe.loggers:
        needs = LOGGERS[name]
        if needs is not None and importlib.util.find_spec(needs[0]) is None:
            raise RecipeError(f"{source}: loggers: {name} needs the {needs[0]} package, which is not installed: "
                              f"pip install 'effft[{needs[1]}]' (or take {name} out of loggers)")


def check_paths(recipe: Recipe, *, source: str) -> None:
    """Files the recipe names must exist before anything starts."""
    if not recipe.data.root.exists():
        raise RecipeError(f"{source}: data.root: {recipe.data.root} does not exist "
                          f"(paths are relative to the folder you run effft from: {Path.cwd()})")
    pretrained = recipe.model.pretrained
    if isinstance(pretrained, str) and Path(pretrained).suffix in {".safetensors", ".pth", ".pt", ".bin", ".ckpt"} \
            and not Path(pretrained).exists():
        raise RecipeError(f"{source}: model.pretrained: weight file {pretrained} does not exist")


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the plain recipe `raw` with each dotted key path of `values` set."""
    out = copy.deepcopy(raw)
    for path, value in values.items():
        set_key(out, path.split("."), value)
    return out


def search_space(recipe: Any, *, source: str) -> list[Param]:
    """The recipe's search space (its `tune:` or the default), every value it allows checked
    against the recipe's schema. One RecipeError names each bad key path."""
    given = recipe.tune if recipe.tune is not None else default_space(recipe)
    params = [check_entry(path, spec) for path, spec in given.items()]  # checked by the schema already
    base = recipe.to_dict()
    base.pop("tune", None)
    problems = []
    for param in params:
        tried = param.values
        if param.kind in ("uniform", "log_uniform"):  # a value between the ends too: an int key refuses it
            tried = (*tried, param.values[0] + 0.37 * (param.values[1] - param.values[0]))
        for value in tried:
            try:
                validate(with_values(base, {param.path: value}), source="")
            except RecipeError as exc:
                why = str(exc).split("\n", 1)[-1].strip()
                problems.append(f"tune.{param.path}: the value {value!r} is refused by the recipe: {why}")
                break
    if problems:
        where = "" if recipe.tune is not None else " (the default search space)"
        raise RecipeError(f"{source}: the search space{where} is not valid:\n  " + "\n  ".join(problems))
    return params

"""Recipes: YAML in user words -> a validated `Recipe`.

Everything is checked before any work starts. A problem ends in one `RecipeError` that names
the key path (`data.augment.train[2].RandomResizedCrop.size`), the value, what is allowed and,
for a misspelt key, the closest valid one. YAML is read with a safe loader: plain data only.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from .schema import Recipe


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
        key, _, msg = error["msg"].removeprefix("Value error, ").partition(": ")
        return f"trainer.{key}: {msg}"
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
    options = set(getattr(annotation, "__args__", (annotation,)))
    if options & {str, Path} and not isinstance(parsed, tuple(t for t in options if isinstance(t, type))):
        return text
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()) and not options & {str, Path}:
        return float(parsed)
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.path=value` of `overrides` in `raw` (in place), typed by the schema."""
    for text in overrides:
        path, value = parse_override(text)
        value = _typed(path, text.partition("=")[2], value)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


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


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return raw if raw is not None else {}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`--set`) and validate a recipe file."""
    raw = read_yaml(Path(path))
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    recipe = validate(raw, source=str(path))
    check_paths(recipe, source=str(path))
    return recipe


def check_paths(recipe: Recipe, *, source: str) -> None:
    """Files the recipe names must exist before anything starts."""
    if not recipe.data.root.exists():
        raise RecipeError(f"{source}: data.root: {recipe.data.root} does not exist "
                          f"(paths are relative to the folder you run effft from: {Path.cwd()})")
    pretrained = recipe.model.pretrained
    if isinstance(pretrained, str) and Path(pretrained).suffix in {".safetensors", ".pth", ".pt", ".bin", ".ckpt"} \
            and not Path(pretrained).exists():
        raise RecipeError(f"{source}: model.pretrained: weight file {pretrained} does not exist")

"""Class ids from what people type: ids, or names (a generator's own, or ImageNet's shipped with
the package), for `rar sample`, `rar inpaint` / `outpaint` and the app."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..core.files import require_path
from ..core.names import is_name


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names in class-id order, with their synonyms (shipped with the package)."""
    return resources.files("rar.data").joinpath("imagenet_classes.txt").read_text().splitlines()


def class_names_of(generator_path, num_classes: int | None = None) -> list[str] | None:
    """Class names saved beside a generator trained by `rar train`; ImageNet's for a 1000-class
    generator without its own (the official ones); else None."""
    meta = Path(generator_path) / "config.json"
    if not is_name(generator_path) and meta.is_file():
        names = json.loads(meta.read_text()).get("class_names")
        if names:
            return names
    return imagenet_class_names() if num_classes == 1000 else None


def parse_classes(text: str, num_classes: int, names: list[str] | None = None, flag: str = "--classes") -> list[int]:
    """"1,7,282" or names ("tench,goldfish") -> class ids, each checked against [0, num_classes).
    Names are separated by commas; a name that several classes share is an error naming them."""
    lookup: dict[str, set[int]] = {}
    for i, n in enumerate(names or []):
        for syn in n.split(","):
            if syn.strip():
                lookup.setdefault(syn.strip().lower(), set()).add(i)
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            c = int(item)
        elif item.lower() in lookup:
            ids = sorted(lookup[item.lower()])
            if len(ids) > 1:
                raise ValueError(f"class name {item!r} is ambiguous (class ids {', '.join(map(str, ids))}); give the id.")
            c = ids[0]
        else:
            known = f"; known names: {', '.join(list(lookup)[:10])}..." if lookup else " (this generator has no class names)"
            raise ValueError(f"class {item!r} is neither a class id nor a known class name{known}.")
        if not 0 <= c < num_classes:
            raise ValueError(f"class id {c} is outside [0, {num_classes}) for this generator.")
        out.append(c)
    if not out:
        raise ValueError(f"{flag} is empty; give class ids such as 1,7,282.")
    return out


def read_class_names(path, num_classes: int | None = None) -> list[str]:
    """One name per line, in class-id order (line i names class i, so no line may be blank);
    several comma-separated synonyms on a line all match. With `num_classes`, one line per class."""
    p = require_path(path, "--class-names", "file", "one class name per line")
    lines = p.read_text().splitlines()
    while lines and not lines[-1].strip():  # a trailing newline or two
        lines.pop()
    blank = next((i for i, line in enumerate(lines) if not line.strip()), None)
    if not lines or blank is not None:
        raise ValueError(f"--class-names {str(p)!r} " + ("is empty" if not lines else f"has a blank line {blank + 1}")
                         + "; expected one class name per line, line i naming class i.")
    if num_classes is not None and len(lines) != num_classes:
        raise ValueError(f"--class-names {str(p)!r} has {len(lines)} names for a generator of {num_classes} classes; "
                         "expected one per class.")
    return [line.strip() for line in lines]

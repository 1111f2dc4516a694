"""`rar.from_pretrained`: a generator or the tokenizer by name or path."""
from __future__ import annotations

from ..core.names import HUB_PREFIX, OFFICIAL, kind_of, resolve
from ..model.weights import load_generator
from ..tokenizer.vqgan import load_any_tokenizer


def from_pretrained(name_or_path, *, cache_dir=None, offline: bool = False):
    """A generator (`rar.RAR`) or the tokenizer (`rar.VQGAN`) by name ("rar_b", "rar_l", "rar_xl",
    "rar_xxl", "maskgit-vqgan", "hf://user/repo") or path (an official file or a saved folder)."""
    s = str(name_or_path)
    t = s.strip()
    if not t or (t.startswith(HUB_PREFIX) and not t[len(HUB_PREFIX):].strip("/")):
        raise ValueError(f"name_or_path {s!r} is empty; expected a path or a name ({', '.join(OFFICIAL)}, "
                         f"{HUB_PREFIX}user/repo).")
    path = resolve(s, cache_dir=cache_dir, offline=offline)
    if not path.exists():
        raise FileNotFoundError(f"{s!r} is neither an existing path nor a known name ({', '.join(OFFICIAL)}, "
                                f"{HUB_PREFIX}user/repo).")
    kind = OFFICIAL[s][2] if s in OFFICIAL else kind_of(path)
    return load_generator(path) if kind == "generator" else load_any_tokenizer(path)

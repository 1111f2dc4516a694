"""Weights by name, offline-first, through the Hugging Face cache (optional extra `hub`).

`resolve(name_or_path)` turns one of the official names into a file in the standard Hugging Face
cache (`huggingface_hub`'s own: HF_HOME / HF_HUB_CACHE, honoured by that library): looked up
there first without any network access, downloaded only when missing and downloads are allowed
(not with HF_HUB_OFFLINE=1, not with `offline=True`). An existing local path is returned as it is
and never touches the network. `from_pretrained` loads what it names: a generator (`rar.RAR`) or
the tokenizer (`rar.VQGAN`); `hf://user/repo` names a folder pushed with `push_to_hub`.
"""
from __future__ import annotations

from pathlib import Path

# name -> (hub repo, file, kind)
OFFICIAL = {
    "rar_b": ("yucornetto/RAR", "rar_b.bin", "generator"),
    "rar_l": ("yucornetto/RAR", "rar_l.bin", "generator"),
    "rar_xl": ("yucornetto/RAR", "rar_xl.bin", "generator"),
    "rar_xxl": ("yucornetto/RAR", "rar_xxl.bin", "generator"),
    "maskgit-vqgan": ("fun-research/TiTok", "maskgit-vqgan-imagenet-f16-256.bin", "tokenizer"),
}
HUB_PREFIX = "hf://"
FOLDER_FILES = ["config.json", "model.safetensors"]


def is_name(name_or_path) -> bool:
    """A name this module resolves (and no existing local path of that name)."""
    s = str(name_or_path)
    return not Path(s).exists() and (s in OFFICIAL or s.startswith(HUB_PREFIX))


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("weights given by name are fetched with huggingface_hub, which is not installed: "
                         "pip install 'rar[hub]' (or pass a local path, which needs nothing).") from None
    return huggingface_hub


def _download(repo: str, filename: str, cache_dir, offline: bool) -> Path:
    """The cached file, looked up without network first; downloaded when missing and allowed."""
    hub = _hub()
    try:
        return Path(hub.hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True))
    except Exception as err:  # huggingface_hub's "not in the cache" errors differ across versions
        missing = err
    where = cache_dir or hub.constants.HF_HUB_CACHE
    if offline or hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{filename} of the Hugging Face repo {repo} is not in the cache {str(where)!r} and "
                                "downloads are off (HF_HUB_OFFLINE or offline=True); download it once online, or "
                                f"pass a local path to the file ({type(missing).__name__}).")
    try:
        return Path(hub.hf_hub_download(repo, filename, cache_dir=cache_dir))
    except Exception as err:
        raise OSError(f"could not download {filename} from the Hugging Face repo {repo} into {str(where)!r} "
                      f"({type(err).__name__}: {err}); pass a local path to the file instead.") from None


def resolve(name_or_path, *, cache_dir=None, offline: bool = False) -> Path:
    """A local path for `name_or_path`: the path itself when it exists, else the cached file (or
    folder, for hf://user/repo) of a name (see the module docstring)."""
    s = str(name_or_path)
    if not is_name(s):
        return Path(s)
    if s in OFFICIAL:
        repo, filename, _ = OFFICIAL[s]
        return _download(repo, filename, cache_dir, offline)
    repo = s[len(HUB_PREFIX):].strip("/")
    files = [_download(repo, f, cache_dir, offline) for f in FOLDER_FILES]
    return files[0].parent


def kind_of(path: Path) -> str:
    """"generator" or "tokenizer" for a local file or folder."""
    import json

    folder = path.parent if path.suffix == ".safetensors" else path
    if (folder / "config.json").is_file():
        fmt = json.loads((folder / "config.json").read_text()).get("format", "")
        return "generator" if fmt == "rar-generator" else "tokenizer"
    if (folder / "tokenizer" / "config.json").is_file():
        return "tokenizer"  # the out_dir of a train_tokenizer run
    import torch
    state = torch.load(path, map_location="meta", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return "generator" if any(k.endswith("lm_head.weight") for k in state) else "tokenizer"


def from_pretrained(name_or_path, *, cache_dir=None, offline: bool = False):
    """A generator (`rar.RAR`) or the tokenizer (`rar.VQGAN`) by name ("rar_b", "rar_l", "rar_xl",
    "rar_xxl", "maskgit-vqgan", "hf://user/repo") or path (an official file or a saved folder)."""
    from .model.weights import load_generator
    from .tokenizer.vqgan import load_any_tokenizer

    s = str(name_or_path)
    path = resolve(s, cache_dir=cache_dir, offline=offline)
    if not path.exists():
        raise FileNotFoundError(f"{s!r} is neither an existing path nor a known name ({', '.join(OFFICIAL)}, "
                                f"{HUB_PREFIX}user/repo).")
    kind = OFFICIAL[s][2] if s in OFFICIAL else kind_of(path)
    return load_generator(path) if kind == "generator" else load_any_tokenizer(path)


def push_to_hub(model, repo_id: str, *, private: bool = False, token=None) -> str:
    """Save `model` (`rar.RAR` or `rar.VQGAN`) as config.json + model.safetensors and upload that
    folder to the Hub repo `repo_id`; returns the repo's URL. `from_pretrained("hf://" + repo_id)`
    loads it back."""
    import tempfile

    hub = _hub()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=tmp, repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"

"""Weight names: official names and hf://user/repo resolved, offline-first, through the Hugging
Face cache (optional extra `hub`).

`resolve(name_or_path)` turns one of the official names into a file in the standard Hugging Face
cache (`huggingface_hub`'s own: HF_HOME / HF_HUB_CACHE, honoured by that library): looked up
there first without any network access, downloaded only when missing and downloads are allowed
(not with HF_HUB_OFFLINE=1, not with `offline=True`). An existing local path is returned as it is
and never touches the network. `hf://user/repo` names a folder uploaded with `upload_folder`
(`model.push_to_hub`); `rar.from_pretrained` (`rar.apps.hub`) loads what a name resolves to.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

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
        import huggingface_hub  # lazy: the optional extra rar[hub]
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
    folder = path.parent if path.suffix == ".safetensors" else path
    if (folder / "config.json").is_file():
        try:
            meta = json.loads((folder / "config.json").read_text())
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise ValueError(f"{str(folder / 'config.json')!r} is not a JSON object; expected the config.json of a "
                             "saved generator or tokenizer.")
        return "generator" if meta.get("format", "") == "rar-generator" else "tokenizer"
    if (folder / "tokenizer" / "config.json").is_file():
        return "tokenizer"  # the out_dir of a train_tokenizer run
    if path.is_dir():
        raise ValueError(f"folder {str(path)!r} holds no config.json; expected a saved generator or tokenizer folder "
                         "(or an official .bin file).")
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - torch's own text (unpickling, zip) would not name the file
        raise ValueError(f"{str(path)!r} is not a checkpoint torch can read; expected an official .bin state dict "
                         "or a saved folder.") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds no state dict; expected an official .bin state dict or a saved folder.")
    return "generator" if any(str(k).endswith("lm_head.weight") for k in state) else "tokenizer"


def upload_folder(save, repo_id: str, *, private: bool = False, token=None) -> str:
    """Call `save(folder)` on a temporary folder and upload what it wrote to the Hub repo
    `repo_id`; returns the repo's URL."""
    hub = _hub()
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=tmp, repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"

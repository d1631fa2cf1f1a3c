"""Models on the Hugging Face Hub: `hf://ORG/NAME[@REVISION]` resolves to a local snapshot folder.

Everything goes through `huggingface_hub.snapshot_download`, so the Hub cache (HF_HUB_CACHE /
HF_HOME), offline mode (HF_HUB_OFFLINE=1: only what is cached, no network) and tokens (HF_TOKEN,
`huggingface-cli login`) behave as in every other Hub library. Only the files a model folder can
hold are fetched (config, weights, tokenizer files), never the whole repository.
"""

from __future__ import annotations

import os
import re

from parcae_jax.errors import UserError

SCHEME = "hf://"
# The official repositories publish no tokenizer next to the weights; their harness uses this one.
OFFICIAL_TOKENIZER_REPO = "SandyResearch/parcae-tokenizer"
MODEL_FILES = (
    "config.json", "model.pt", "pytorch_model.bin", "model.safetensors", "model.bin",  # official
    "params/**", "extra.npz",  # parcae-jax native folders
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "tokenizer/**",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(UserError):
    """A Hub repository cannot be resolved (not found, not cached while offline, no access)."""


def is_hub_path(path: str | os.PathLike) -> bool:
    return str(path).startswith(SCHEME)


def parse(path: str) -> tuple[str, str | None]:
    """`hf://ORG/NAME[@REV]` (or a bare `ORG/NAME[@REV]`) -> (repo_id, revision or None)."""
    name = str(path).removeprefix(SCHEME).strip("/")
    repo_id, _, revision = name.partition("@")
    if not _REPO_ID.match(repo_id):
        raise HubError(f"{path!r} is not a Hub model name; expected hf://ORG/NAME (optionally @REVISION)")
    return repo_id, revision or None


def looks_like_repo_id(name: str | os.PathLike) -> bool:
    """True for `ORG/NAME` that is not an existing local path (how `load_pretrained` tells them apart)."""
    name = str(name)
    return bool(_REPO_ID.match(name.partition("@")[0])) and not os.path.exists(os.path.expanduser(name))


def in_cache(folder: str | os.PathLike) -> bool:
    """True when `folder` is a snapshot inside the Hub cache."""
    from huggingface_hub import constants

    cache = os.path.realpath(constants.HF_HUB_CACHE)
    return os.path.realpath(folder).startswith(cache + os.sep)


def snapshot(path: str, allow_patterns=MODEL_FILES) -> str:
    """The local folder holding the Hub repository `path` (downloaded into the Hub cache if needed)."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    repo_id, revision = parse(path)
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                   allow_patterns=list(allow_patterns))
    except hub_errors.LocalEntryNotFoundError:
        raise HubError(
            f"hf://{repo_id}: not in the Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE is "
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); connect once to download it, or point at a "
            "local folder"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise HubError(f"hf://{repo_id}: no such repository (or it is private: log in with "
                       "`huggingface-cli login` or set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(f"hf://{repo_id}: no revision {revision!r}") from None
    except hub_errors.HfHubHTTPError as e:
        raise HubError(f"hf://{repo_id}: the Hub answered {e}") from None
    return folder


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                message: str = "Upload with parcae-jax") -> str:
    """Publish a model folder as the Hub repository `repo_id` (created if needed); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    repo_id, _ = parse(repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=message)
    except hub_errors.HfHubHTTPError as e:
        raise HubError(f"pushing to hf://{repo_id} failed: {e} (log in with `huggingface-cli login` or "
                       "set HF_TOKEN)") from None
    return str(url)

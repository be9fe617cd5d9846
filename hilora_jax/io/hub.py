"""The Hugging Face hub: the one place files are downloaded (model and adapter sources given as
`org/name` ids). With `HF_HUB_OFFLINE=1` only the local hub cache is used."""

from __future__ import annotations

import os
from pathlib import Path

from hilora_jax.errors import SourceUnavailableError


def hub_download(repo_id: str, allow_patterns=("*.json", "*.safetensors", "*.model", "*.txt")) -> Path:
    """Snapshot of `repo_id` (only files matching `allow_patterns`); a failure is one
    `SourceUnavailableError` line naming the repo and whether the hub was offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ImportError("loading from the hub needs `huggingface_hub`") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns)))
    except Exception as e:
        hint = (" (HF_HUB_OFFLINE is set: only files already in the local hub cache can be used)"
                if offline else " (is the hub reachable from this machine?)")
        msg = " ".join(str(e).split())
        raise SourceUnavailableError(f"could not fetch {repo_id!r} from the Hugging Face hub"
                                     f"{hint}: {type(e).__name__}: {msg}") from e

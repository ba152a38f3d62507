"""The Hugging Face Hub: pushing an exported folder (`--push_to_hub REPO_ID`) and pulling a model repo for
`from-pytorch --torch OWNER/NAME`, through huggingface_hub.

- A `--torch` value is a local path when it exists (or a gs:// URL), else a Hub repo id when it has the form
  "owner/name" (huggingface_hub's `validate_repo_id`), "owner" is no local folder and "name" no file name of a
  checkpoint (.pth, .safetensors, .json, .model), else an error: a typo in a local path is reported as a missing
  path, and a download failure says that --torch was read as a repo id.
- The token is huggingface_hub's (`get_token`: the HF_TOKEN environment variable, else the one `hf auth login`
  stored); pushing without one is refused before anything is converted. Downloads of public repos need none.
"""

from __future__ import annotations

import os
from typing import Optional

from megalodon_jax import paths
from megalodon_jax.errors import ConvertError

# What a download fetches of a model repo: the weights, configs and tokenizer from-pytorch reads.
# Names that end so are files of a local checkpoint, never Hub repo ids.
_FILE_SUFFIXES = (".pth", ".safetensors", ".json", ".model")
DOWNLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.pth", "*.json", "tokenizer.model")


def is_repo_id(text: str) -> bool:
  """Whether `text` has the form of a Hub model repo id "owner/name" (exactly one slash, huggingface_hub's rules
  for the characters)."""
  from huggingface_hub.utils import HFValidationError, validate_repo_id  # pylint: disable=import-outside-toplevel
  if text.count("/") != 1:
    return False
  try:
    validate_repo_id(text)
  except HFValidationError:
    return False
  return True


def torch_source(text: str, flag: str = "--torch") -> Optional[str]:
  """The repo id that `text` names, or None when it is a path (an existing local path or a remote URL).

  Raises:
    ConvertError: neither an existing path nor a repo id.
  """
  if paths.is_remote(text) or os.path.exists(os.path.expanduser(text)):
    return None
  owner, _, name = text.partition("/")
  # A missing file in an existing folder, or a weights/config file name, is a mistyped path, not a repo.
  if is_repo_id(text) and not os.path.isdir(os.path.expanduser(owner)) and not name.endswith(_FILE_SUFFIXES):
    return text
  raise ConvertError(f"{flag} {text} does not exist (and is not a Hugging Face Hub repo id of the form owner/name)")


def download(repo_id: str, revision: Optional[str] = None) -> str:
  """Downloads the model files of `repo_id` (at `revision`) into huggingface_hub's cache; returns the local folder.

  Raises:
    ConvertError: the repo or revision does not exist, is gated or private without a token, or the Hub cannot be
      reached (the message says which and keeps huggingface_hub's reason).
  """
  # pylint: disable=import-outside-toplevel
  import httpx
  import huggingface_hub
  from huggingface_hub import errors
  at = f"{repo_id}" + (f" at revision {revision}" if revision else "")
  try:
    return huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision, repo_type="model",
                                             allow_patterns=list(DOWNLOAD_PATTERNS))
  except errors.GatedRepoError:
    raise ConvertError(f"--torch {at}: the Hub repo is gated; accept its terms and set HF_TOKEN") from None
  except errors.RepositoryNotFoundError:
    raise ConvertError(f"--torch {at}: no such model repo on the Hub (or it is private and no token is set: "
                       f"HF_TOKEN). --torch is read as a Hub repo id because no local path {repo_id} exists") from None
  except errors.RevisionNotFoundError:
    raise ConvertError(f"--torch {at}: the repo has no such revision") from None
  except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ConnectionError, httpx.HTTPError) as e:
    raise ConvertError(f"--torch {at}: downloading from the Hub failed ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:300]}); --torch is read as a Hub repo id because no local path "
                       f"{repo_id} exists") from None


def push_token(repo_id: str) -> str:
  """The token for pushing to `repo_id`, checked before any work: the repo id is valid and a token is set.

  Raises:
    ConvertError: an invalid repo id or no token.
  """
  # pylint: disable=import-outside-toplevel
  from huggingface_hub import get_token
  from huggingface_hub.utils import HFValidationError, validate_repo_id
  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    raise ConvertError(f"--push_to_hub {repo_id} is not a Hub repo id ({e})") from None
  token = get_token()
  if not token:
    raise ConvertError(f"--push_to_hub {repo_id} needs a Hugging Face token with write access: set HF_TOKEN (or run "
                       "`hf auth login`)")
  return token


def push(folder: str, repo_id: str, *, token: str, private: bool = False,
         commit_message: Optional[str] = None) -> str:
  """Creates the model repo `repo_id` if it does not exist (private if asked; an existing repo keeps its
  visibility) and uploads every file of the local `folder` in one commit; returns the commit's URL.

  Raises:
    ConvertError: the Hub refused or could not be reached (the local folder is kept).
  """
  # pylint: disable=import-outside-toplevel
  import httpx
  from huggingface_hub import HfApi, errors
  api = HfApi(token=token)
  try:
    api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                             commit_message=commit_message or f"Upload {os.path.basename(folder.rstrip('/'))}")
  except (errors.HfHubHTTPError, OSError, ConnectionError, httpx.HTTPError) as e:
    raise ConvertError(f"--push_to_hub {repo_id}: the upload failed ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:300]}); the export in {folder} is complete, push it again with "
                       f"`hf upload {repo_id} {folder}`") from None
  return str(getattr(info, "commit_url", info))

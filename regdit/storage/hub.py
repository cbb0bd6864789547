"""`hf://` paths: files and folders of Hugging Face Hub repositories, wherever regdit reads a file.

`hf://[datasets/]OWNER/REPO/PATH[@REVISION]` (or huggingface_hub's own
`hf://OWNER/REPO@REVISION/PATH`) names a file when the last part of PATH has a suffix (`4000000.pt`,
`model.safetensors`), else a folder (`vae`, or the whole repository when PATH is empty).
`resolve_path` fetches it through huggingface_hub: its cache (HF_HUB_CACHE), its progress bars and
its token (HF_TOKEN or `hf auth login`); with HF_HUB_OFFLINE=1 the cache alone serves. Any other
path is returned as it is: nothing is downloaded unless an `hf://` path asks for it. A URL is parsed
strictly (see `parse`) and what it resolves to must lie inside its repository's cache folder.
`model_card` and `push_folder` publish an export (`regdit export --push-to-hub`).
"""
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import SPECIAL_REFS_REVISION_REGEX
from huggingface_hub.utils import validate_repo_id

from regdit import RegditError
from regdit.files import check_regular_file, file_kind

PREFIX = "hf://"


def is_hub_url(path):
    return isinstance(path, str) and path.startswith(PREFIX)


@dataclass(frozen=True)
class HubPath:
    url: str
    repo_id: str
    path: str  # inside the repository; "" is its root
    revision: str | None
    repo_type: str  # model or dataset

    @property
    def is_file(self):
        return bool(PurePosixPath(self.path).suffix)

    def at(self, path):
        """The `hf://` URL of `path` in the same repository and revision."""
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{prefix}{self.repo_id}/{path.strip('/')}{revision}"

    def download_command(self):
        """The `hf download` command that puts this file or folder into the cache."""
        target = self.path if self.is_file else f"--include '{self.path}/*'" if self.path else ""
        options = [f"--revision {self.revision}" if self.revision else "",
                   "--repo-type dataset" if self.repo_type == "dataset" else ""]
        return " ".join(part for part in ("hf download", self.repo_id, target, *options) if part)


# a branch, tag or commit hash: letters, digits and _ . + - after the first
REVISION = re.compile(r"[\w][\w.+-]*")


def _revision_and_path(rest):
    """(revision or None, PATH) of what follows OWNER/REPO: `@REVISION/PATH`, `/PATH@REVISION` or
    `/PATH`. A revision holds no '/' but huggingface_hub's special refs (refs/pr/N,
    refs/convert/NAME) in either place: any other would make the PATH ambiguous."""
    if "@" not in rest:
        return None, rest
    if rest.startswith("@"):  # huggingface_hub's form
        after = rest[1:]
        special = SPECIAL_REFS_REVISION_REGEX.match(after)
        if special and after[special.end():special.end() + 1] in ("", "/"):
            return after[:special.end()], after[special.end():]
        revision, _, path = after.partition("/")
        return revision, path
    path, _, revision = rest.rpartition("@")
    return revision, path


def parse(url, what=None):
    """The repository, path and revision of an `hf://` URL. Strict: PATH has no '.', '..' or empty
    parts and no backslash, there is at most one @REVISION (right after the repository or at the
    very end), and a revision is a branch, tag, commit hash or special ref (see _revision_and_path).
    Anything else is a one-line RegditError naming `what` and the URL."""
    def refuse(reason):
        return RegditError(f"{what + ' ' if what else ''}{url} is not a Hub path ({reason}): write "
                           "hf://OWNER/REPO/PATH[@REVISION]")

    rest, repo_type = url[len(PREFIX):], "model"
    if rest.startswith("datasets/"):
        rest, repo_type = rest[len("datasets/"):], "dataset"
    owner, _, rest = rest.partition("/")
    name_end = min((i for i in (rest.find("/"), rest.find("@")) if i >= 0), default=len(rest))
    name, rest = rest[:name_end], rest[name_end:]
    try:
        validate_repo_id(f"{owner}/{name}")
        if not owner or not name:
            raise HFValidationError("no OWNER/REPO")
    except HFValidationError as error:
        raise refuse(str(error).splitlines()[0]) from None
    if rest.count("@") > 1:
        raise refuse("two revisions; give one")
    if "\\" in rest:
        raise refuse("a backslash; parts are separated by /")
    revision, path = _revision_and_path(rest)
    if revision is not None and not (REVISION.fullmatch(revision) and revision != "refs"
                                     or SPECIAL_REFS_REVISION_REGEX.fullmatch(revision)):
        raise refuse(f"revision {revision!r} is not a branch, tag or commit hash, nor refs/pr/N or "
                     "refs/convert/NAME" if revision else "an empty revision after @")
    path = path.removeprefix("/").removesuffix("/")  # a trailing / may mark a folder
    if path and any(part in ("", ".", "..") for part in path.split("/")):
        raise refuse(f"the path {path!r} has an empty, '.' or '..' part")
    return HubPath(url, f"{owner}/{name}", path, revision, repo_type)


def _not_cached(hub, what):
    reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    return RegditError(f"{what} {hub.url} is not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) and {reason}: fetch it once with "
                       f"`{hub.download_command()}` on a machine with network (same HF_HUB_CACHE), "
                       "then HF_HUB_OFFLINE=1 works")


@contextlib.contextmanager
def _hub_errors(hub, what):
    """huggingface_hub's errors as one line naming `what`, the URL and the fix."""
    where = f"{what} {hub.url}"
    try:
        yield
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        raise _not_cached(hub, what) from None
    except GatedRepoError:
        raise RegditError(f"{where}: {hub.repo_id} is gated: accept its terms on huggingface.co, "
                          "then log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise RegditError(f"{where}: no repository {hub.repo_id} on the Hub, or it is private: "
                          "check the name, or log in (`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise RegditError(f"{where}: {hub.repo_id} has no revision {hub.revision}") from None
    except EntryNotFoundError:
        raise RegditError(f"{where}: {hub.repo_id} has no file {hub.path}: check the path on "
                          f"https://huggingface.co/{hub.repo_id}") from None
    except HfHubHTTPError as error:
        raise RegditError(f"{where}: the Hub refused ({one_line(error)})") from None
    except ValueError as error:
        # huggingface_hub's refusal of a path that would leave its repository's cache folder: a
        # listed file name with '..', a refs file holding a path
        raise RegditError(f"{where}: huggingface_hub refused a path of {hub.repo_id} "
                          f"({one_line(error)}): the repository lists a file outside itself, or "
                          f"its cache folder {_repo_cache(hub)} is damaged (delete it and fetch "
                          "the path again)") from None


def one_line(error):
    """The first line of a library's message, which may span several."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()),
                type(error).__name__)


def _repo_cache(hub):
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=hub.repo_id,
                                                           repo_type=hub.repo_type)


COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def _check_cache(hub, what):
    """One line, before huggingface_hub reads or writes its cache, for a cache that cannot work:
    HF_HUB_CACHE or the repository's folder in it a file or a link that leads nowhere, or the
    refs file of the revision (`refs/main`) anything but a file holding a commit hash."""
    where = f"{what} {hub.url}"
    repo = _repo_cache(hub)
    for folder in (Path(constants.HF_HUB_CACHE), repo):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            kind = ("a link that leads nowhere" if not os.path.exists(folder)
                    else file_kind(os.stat(folder).st_mode))
            raise RegditError(f"{where}: the Hugging Face cache folder {folder} is {kind}; remove "
                              "it or set HF_HUB_CACHE to a folder")
    revision = hub.revision or "main"
    refs = repo / "refs" / revision
    if COMMIT_HASH.fullmatch(revision) or not os.path.lexists(refs):
        return
    check_regular_file(refs, f"{where}: the Hugging Face cache's")
    with open(refs, "rb") as f:  # a commit hash is 40 characters: read no more than a line
        commit = f.read(128).decode(errors="replace").strip()
    if not COMMIT_HASH.fullmatch(commit):
        raise RegditError(f"{where}: the Hugging Face cache's {refs} holds {commit[:80]!r}, not a "
                          f"commit hash; delete it and fetch the path again")


def resolve_path(path, what, beside=()):
    """The local Path of `path` (`what` names it in errors: "checkpoint", "VAE folder"). An `hf://`
    file is downloaded into the cache with the files named in `beside` from its folder (an export's
    config.json); an `hf://` folder with all its files. Every other path comes back unchanged, as a
    Path."""
    if not is_hub_url(path):
        return Path(path)
    hub = parse(path, what)
    _check_cache(hub, what)
    location = dict(repo_id=hub.repo_id, revision=hub.revision, repo_type=hub.repo_type)
    if hub.is_file:
        with _hub_errors(hub, what):
            local = Path(hf_hub_download(filename=hub.path, **location))
        _check_inside_cache(hub, local, what)
        for name in beside:
            resolve_path(hub.at(str(PurePosixPath(hub.path).with_name(name))),
                         f"{name} of {what} {path}")
        return local
    with _hub_errors(hub, what):
        # offline, snapshot_download returns the cached snapshot without checking that it holds the
        # folder
        patterns = [f"{hub.path}/*"] if hub.path else None
        local = Path(snapshot_download(allow_patterns=patterns, **location)) / hub.path
    if not local.is_dir() or not any(local.iterdir()):
        if constants.HF_HUB_OFFLINE:
            raise _not_cached(hub, what)
        raise RegditError(f"{what} {path}: {hub.repo_id} has no folder {hub.path}: check the path "
                          f"on https://huggingface.co/{hub.repo_id}")
    _check_inside_cache(hub, local, what)
    return local


def _check_inside_cache(hub, local, what):
    """Refuse a file or folder of the cache that leads out of its repository's cache folder. The
    cache links each file of a snapshot to its blobs/ (or copies it where links are unsupported), so
    every real path, symbolic links followed, of `local` and of all it holds must lie inside that
    folder."""
    repo_cache = os.path.realpath(_repo_cache(hub))
    entries = [local] + [Path(folder) / name for folder, folders, files in os.walk(local)
                         for name in folders + files]
    for entry in entries:
        real = os.path.realpath(entry)
        if os.path.commonpath([real, repo_cache]) != repo_cache:
            raise RegditError(f"{what} {hub.url}: {entry} in the Hugging Face cache leads to "
                              f"{real}, outside the cache folder of {hub.repo_id} ({repo_cache}); "
                              "delete that folder and fetch the path again")



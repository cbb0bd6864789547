"""Files: atomic writes, the rules for what a command may write (`check_output`) and read
(`check_regular_file`), headers read before data, and OS errors a user can fix said in one line."""
import contextlib
import errno
import os
import shutil
import stat
import zipfile
from pathlib import Path

from regdit import RegditError

TEMP_SUFFIX = ".tmp"  # atomic_write's temp files are .NAME.tmpPID


@contextlib.contextmanager
def atomic_write(path, mode="wb", sync=True):
    """Open a temp file beside `path` for writing, then rename it over `path`: an interrupted run, a
    crash or a full disk never leaves a half-written file in place of the previous one. `sync` also
    fsyncs before the rename, so the file survives a machine crash (checkpoints); per-image files
    skip it for speed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        # name the file being written, not its temp file (or none: a failed write)
        if error.filename in (None, str(tmp)):
            error.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def remove_temp_files(folder):
    """Delete the temp files that killed writes left under `folder` (`.NAME.tmpPID`); call it
    holding the folder's lock, when no other writer can be mid-write. Returns how many were
    removed."""
    leftovers = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}*")
                 if p.is_file() and temp_file_target(p.name)]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def temp_file_target(name):
    """The name of the file that the file name `name` is atomic_write's temp file of (`.NAME.tmpPID`
    -> NAME), else None."""
    stem, suffix, pid = name.rpartition(TEMP_SUFFIX)
    return stem[1:] if suffix and stem.startswith(".") and pid.isdigit() else None


def check_writable(path, flag):
    """One line naming `flag` when the folder `path` (to be created or filled) cannot be written,
    before any work."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RegditError(f"{flag} {path}: {existing} is a file, not a folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RegditError(f"{flag} {path}: {existing} is not writable (read-only or no "
                          "permission); pass a writable folder")


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def file_kind(mode):
    """What an `os.stat` mode is, in words: "a file" (a regular one), "a folder", "a FIFO (named
    pipe)", ..."""
    return next((name for test, name in FILE_KINDS if test(mode)), "a file")


def check_output(path, flag=None, foreign=None, inputs=None, folder=False):
    """One line unless this command may write `path`: a new path, or a file (with `folder`: a
    folder) that the command wrote before, never one of its `inputs` nor a FIFO or device.
    `foreign(path)` recognises the command's own earlier output by its format: None when it is, else
    what it is instead ("it is not a metrics JSON"); without it any file (folder) is taken. `inputs`
    maps names to the paths the command reads ({"--ckpt": path}); they are compared as files, so
    that a link or another spelling of an input is caught too. `flag` names the setting that chose
    `path`, for the fix (None: the command chose it). Only `foreign` reads `path`, and only a file
    or folder: opening a FIFO would block."""
    path = Path(path)
    fix = f"move it away or pass another {flag}" if flag else "move it away"
    for name, source in (inputs or {}).items():
        if source is not None and _same_file(path, source):
            raise RegditError(f"cannot write {path}: it is the {name} {source}, which this command "
                              f"reads; pass another {flag}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise RegditError(f"cannot write {path}: a folder on its path is a file; {fix}") from None
    wanted = "a folder" if folder else "a file"
    if file_kind(mode) != wanted:
        raise RegditError(f"cannot write {path}: it is {file_kind(mode)}, not {wanted}; {fix}")
    reason = foreign and foreign(path)
    if reason:
        raise RegditError(f"cannot write {path}: {reason}; {fix}")


def _same_file(path, other):
    """True when `path` and `other` name the same file (through links or other spellings) or would
    once written."""
    try:
        return os.path.samefile(path, other)
    except (OSError, ValueError):  # one of them does not exist (yet), or is no local path
        return os.path.realpath(path) == os.path.realpath(other)


def npz_arrays(path):
    """The names of the arrays in the .npz `path`, from its zip directory alone (none for another
    kind of file)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except zipfile.BadZipFile:
        return set()


def check_regular_file(path, what=None, folder=False):
    """The rule for every file a command reads: a one-line RegditError naming `what` (the flag or
    setting that named the file: "--ref-batch", "checkpoint") and `path` when `path` exists but is
    not a regular file (or a link to one): a folder (unless `folder` allows one), FIFO, device or
    socket named like an image or array would fail late, block (a FIFO waits for a writer) or read
    without end. Only stat is called, never open. A missing path is left to the caller, whose
    message says what to pass."""
    try:
        kind = file_kind(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, a file on the way, a NUL byte: the caller's open says
        return
    if kind == "a file" or folder and kind == "a folder":
        return
    wanted = "a file or folder" if folder else "a file"
    raise RegditError(f"{what + ' ' if what else ''}{path} is not a regular file: it is {kind}; "
                      f"replace it with {wanted} or pass another path")


def npz_headers(path):
    """{name: (shape, dtype)} of the arrays in the .npz `path`, read from their .npy headers alone,
    so that sizes are checked before any array is loaded; ValueError or zipfile.BadZipFile for a
    damaged file."""
    import numpy as np

    headers = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            headers[name.removesuffix(".npy")] = shape, dtype
    return headers


def read_head(path, size):
    """The first `size` bytes of the regular file `path` (a recogniser's look at a file, never all
    of a large one)."""
    with open(path, "rb") as f:
        return f.read(size)


FREE_SPACE = "free space on the disk, then rerun the same command to continue"
MAKE_WRITABLE = "make it writable and rerun the same command, or choose a writable output folder"
WRITE_ERROR_FIXES = {  # OS errors a user fixes, not bugs: one line instead of a traceback
    errno.ENOSPC: FREE_SPACE, errno.EDQUOT: FREE_SPACE,
    errno.EROFS: MAKE_WRITABLE, errno.EACCES: MAKE_WRITABLE, errno.EPERM: MAKE_WRITABLE,
}


def describe_os_error(error):
    """One line for an OS error the user can fix (a missing path, a full disk, a read-only or
    foreign folder), else None (a bug: keep the traceback). Every finished file was written
    atomically, so the same command resumes."""
    where = error.filename or "a file"
    if error.errno == errno.ENOENT:
        return f"{where}: no such file or folder; check the path"
    if error.errno == errno.ENOTDIR:
        return (f"{where}: a file stands where a folder of this path goes; move it or pick "
                "another path")
    fix = WRITE_ERROR_FIXES.get(error.errno)
    reason = error.strerror or os.strerror(error.errno or 0)
    if fix == FREE_SPACE and error.filename:
        reason += f", {free_space(error.filename)} free there"
    return fix and f"cannot write {where} ({reason}); {fix}"


def free_space(path):
    """The free space of the disk that holds `path` (or its nearest existing folder), in words:
    "12.3 MiB"."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:.3g} {unit}"
        free /= 1024
    return f"{free:.3g} TiB"


@contextlib.contextmanager
def writing_into(folder):
    """Name `folder` in OS errors that name no file (a failed write or fsync of an open file), so
    that the one-line message says where."""
    try:
        yield
    except OSError as error:
        error.filename = error.filename or str(folder)
        raise

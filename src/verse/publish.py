"""Every file or directory Verse writes to a user's disk goes through here: staged, flushed, published atomically.

A writer fills a hidden temporary sibling of its target (`staged`); on success the output gets the modes the
umask gives new files (safetensors and `tempfile` create them private, 0600/0700), is fsynced, and takes the
target's place with one rename (`renameat2(RENAME_NOREPLACE)`), or, when replacing is allowed, one atomic
exchange (`RENAME_EXCHANGE`) after which the old content is removed. On failure the temporary is removed and the
target is exactly as it was. `check_destination` and `check_distinct` refuse, before any work, to write over what
a user owns or into the source being read.
"""

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from verse.errors import VerseError

RENAME_NOREPLACE = 1  # linux/fs.h
RENAME_EXCHANGE = 2
OVERWRITE_HINT = "pass --overwrite (overwrite=True) to replace it, or choose another path"


def umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(path: Path) -> None:
    """Give `path` and everything under it the modes new files get (0644 / 0755 under umask 022).

    Only for outputs Verse has just written (never for a user's files); symbolic links are left alone.

    Args:
        path (Path): a file or directory tree.
    """
    mask = umask()
    if path.is_symlink() or not path.is_dir():
        if not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, (0o777 if name in dirs else 0o666) & ~mask)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames and new files in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (or the file itself), and the directories, to disk."""
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(Path(root))


def seal(path: Path) -> None:
    """Make a freshly written output ready to publish: normal modes (`normal_modes`), then flushed (`fsync_tree`)."""
    normal_modes(path)
    fsync_tree(path)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """`renameat2(2)` of two entries of one directory with `flags`; False when the C library or the filesystem
    does not offer it."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done = func(fd, os.fsencode(src.name), fd, os.fsencode(dst.name), flags) == 0
    finally:
        os.close(fd)
    if done:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _remove(path: Path) -> None:
    """Remove a temporary or replaced output, as far as possible (a leftover never fails a finished write)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def publish(tmp: Path, target: Path, replace: bool = False) -> None:
    """Put the sealed output `tmp` at `target` in one atomic step, then flush the parent directory.

    A missing target (or an empty directory) is taken by a rename that never overwrites; an existing one only with
    `replace`, by exchanging the two and then removing the old content (without `renameat2`: the old target is
    renamed aside first and put back if the second rename fails).

    Args:
        tmp (Path): the complete output, a sibling of `target`.
        target (Path): where it goes.
        replace (bool): allow replacing an existing target.
    """
    empty_dir = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
    if not (target.exists() or target.is_symlink()):
        if not _renameat2(tmp, target, RENAME_NOREPLACE):
            if target.exists():
                raise FileExistsError(errno.EEXIST, "appeared while writing", str(target))
            os.rename(tmp, target)
    elif replace or empty_dir:
        if not _renameat2(tmp, target, RENAME_EXCHANGE):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, aside / "old")
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside / "old", target)
                aside.rmdir()
                raise
            os.rename(aside / "old", tmp)
            aside.rmdir()
        fsync_dir(target.parent)
        _remove(tmp)  # now the old content
    else:
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    fsync_dir(target.parent)


@contextlib.contextmanager
def staged(target: Path, directory: bool = True, replace: bool = False,
           keep: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `target` to write the output into; publish it when the block succeeds.

    Args:
        target (Path): the final file or directory (its parent must exist).
        directory (bool): stage a directory (else a file, created empty).
        replace (bool): the output may replace an existing `target` (see `publish`).
        keep (Sequence[str]): entries of the existing target directory to carry into the new one (hard links, or
            copies where links fail), e.g. a checkpoint's `train_state/` when the model is re-saved; an entry the
            output also writes is replaced by the new one, unless it is a directory (then this refuses).

    Yields:
        Path: the temporary path; removed, and `target` left as it was, if the block raises (an `OSError` becomes
        a one-line `VerseError`).
    """
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        for entry in tmp.rglob("*") if directory else ():
            if entry.is_symlink():
                raise VerseError(f"{entry.name}: refusing to publish a symbolic link into {target}")
        normal_modes(tmp)
        for name in keep:
            old, new = target / name, tmp / name
            if not (new.exists() or new.is_symlink()):
                _carry(old, new)
            elif old.is_dir() and not old.is_symlink() and not new.is_dir():
                raise VerseError(f"{old}: a directory where the output writes a file; move it away, or "
                                 f"replace the whole directory (--overwrite / overwrite=True)")
        fsync_tree(tmp)
        publish(tmp, target, replace=replace or bool(keep))
    except BaseException as e:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        if isinstance(e, OSError):  # disk full, permissions, a vanished directory: one line, target untouched
            raise VerseError(f"{target}: writing failed ({e.strerror or e}"
                             f"{f': {e.filename}' if e.filename else ''}); {target} is left as it was") from None
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a user's entry into a staged directory, keeping symbolic links as links."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def check_destination(path: str | Path, overwrite: bool = False, directory: bool = True) -> Path:
    """Refuse, before any work, to write over what a user has at `path`; create its parent.

    A directory output may go to a new path or an empty directory, a file output to a new path; anything else
    needs `overwrite` (the output then replaces it whole, atomically). Symbolic links, a file where a directory
    goes and a directory where a file goes are always refused.

    Args:
        path (str | Path): the output path.
        overwrite (bool): the user allowed replacing an existing output.
        directory (bool): the output is a directory (else a file).

    Returns:
        Path: the absolute output path.
    """
    target = Path(path).expanduser()
    if target.is_symlink():
        raise VerseError(f"{target}: is a symbolic link; give a real path to write to")
    if directory and target.exists() and not target.is_dir():
        raise VerseError(f"{target}: exists and is not a directory; give a new or empty directory")
    if not directory and target.is_dir():
        raise VerseError(f"{target}: is a directory; give a file name")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise VerseError(f"{target}: directory exists and is not empty; {OVERWRITE_HINT}")
    if not overwrite and not directory and target.exists():
        raise VerseError(f"{target}: file exists; {OVERWRITE_HINT}")
    target = target.absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VerseError(f"{target.parent}: cannot create the output's parent directory ({e.strerror})") from None
    return target


def _identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[Path]:
    """`path` resolved and each of its ancestors."""
    path = path.expanduser().resolve()
    return [path, *path.parents]


def check_distinct(src: str | Path, dst: str | Path) -> None:
    """Refuse a destination that is the source, lies inside it or holds it.

    Paths are compared resolved (`..`, symbolic links) and by inode (hard links, bind mounts), so
    `src/../src`, a link to the source or `g.gguf` vs `sub/../g.gguf` are all caught.

    Args:
        src (str | Path): the input file or directory (a path that does not exist is ignored, e.g. a Hub id).
        dst (str | Path): the output path.
    """
    src, dst = Path(src), Path(dst)
    source = _identity(src)
    if source is None:
        return
    dst_chain, src_chain = _chain(dst), _chain(src)
    if dst_chain[0] == src_chain[0] or _identity(dst_chain[0]) == source:
        raise VerseError(f"{dst}: is the source {src}; choose another destination")
    if src_chain[0] in dst_chain or source in {_identity(p) for p in dst_chain[1:]}:
        raise VerseError(f"{dst}: lies inside the source {src}; choose a destination outside it")
    target = _identity(dst_chain[0])
    if dst_chain[0] in src_chain or (target is not None and target in {_identity(p) for p in src_chain[1:]}):
        raise VerseError(f"{dst}: holds the source {src}; choose a destination that does not contain it")

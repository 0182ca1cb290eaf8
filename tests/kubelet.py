"""A ConfigMap volume laid out on disk the way the kubelet lays it, and updated the way it updates it.

The kubelet's atomic writer (kubernetes `pkg/volume/util/atomic_writer.go`) never writes over a file
that a pod can see. Each version of the ConfigMap goes into a fresh hidden directory named after the
time, `..data` is a symlink to the current one, and every top-level name the pod sees is a symlink
through it:

    MOUNT/..2026_12_01_15_04_05.1234567/config.yaml
    MOUNT/..2026_12_01_15_04_05.1234567/policies/test.yaml
    MOUNT/..data -> ..2026_12_01_15_04_05.1234567
    MOUNT/config.yaml -> ..data/config.yaml
    MOUNT/policies -> ..data/policies

An update writes the next directory whole, points a temporary symlink `..data_tmp` at it and renames
that over `..data` (one atomic step: a reader sees the old version or the new, never a mix within one
open), adds the links of new top-level names, removes those of names gone, then deletes the old
directory. Nothing is written in place, so the files' own paths keep their mtime until they resolve
elsewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"


class ConfigMapVolume:
    """The mount point of one ConfigMap volume: `write` lays down a version of its files."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        mount.mkdir(parents=True, exist_ok=True)

    def current(self) -> Path | None:
        """The directory `..data` points at now (None before the first write)."""
        link = self.mount / DATA
        return self.mount / os.readlink(link) if link.is_symlink() else None

    def write(self, files: Mapping[str, str], *, keep_mtimes: bool = False) -> Path:
        """Lay down `files` (path in the volume, as a ConfigMap item's `path`, -> text) as the next
        version, swapped in atomically; the new version's directory.

        `keep_mtimes` gives each new file the mtime of the file at its path in the last version, as
        `tar` or `rsync -a` keep an original's: a watcher that compares only mtime and size cannot tell
        a same-size edit from the last version.
        """
        old = self.current()
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        new = Path(tempfile.mkdtemp(prefix=stamp, dir=self.mount))
        new.chmod(0o755)
        for rel, text in files.items():
            path = new / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            path.chmod(0o644)
            if keep_mtimes and old is not None and (old / rel).exists():
                mtime = (old / rel).stat().st_mtime_ns
                os.utime(path, ns=(mtime, mtime))
        tmp = self.mount / (DATA + "_tmp")
        tmp.symlink_to(new.name)
        os.rename(tmp, self.mount / DATA)  # the swap
        visible = {Path(rel).parts[0] for rel in files}
        for name in sorted(visible):
            link = self.mount / name
            if not link.is_symlink():
                link.symlink_to(f"{DATA}/{name}")
        for link in self.mount.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in visible:
                link.unlink()
        if old is not None:
            shutil.rmtree(old)
        return new

"""Put tcmalloc where the trainer finds it: ``<venv>/lib/native/libtcmalloc_minimal.so.4``.

Called by ``make setup``. Uses an existing system copy if there is one; otherwise downloads
Debian's ``libtcmalloc-minimal4`` with ``apt-get download`` (no root needed, nothing installed
system-wide) and unpacks the library with ``dpkg-deb``. Optional: on a machine without apt it
says so and exits 0; training then runs on glibc's malloc (see ``slime/utils/allocator.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from slime.utils.allocator import LIBRARY, find_tcmalloc, venv_native_dir
from slime.utils.atomic import write_file_atomically

PACKAGE = "libtcmalloc-minimal4"


def fetch(dest_dir: Path) -> Path:
    """Download and unpack the Debian package; returns the installed library path."""
    with tempfile.TemporaryDirectory(prefix="tcmalloc-") as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write the .deb
        subprocess.run(["apt-get", "download", "-q", PACKAGE], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        lib = next((Path(tmp) / "root").rglob(LIBRARY)).resolve()
        dest_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomically(dest_dir / LIBRARY, lambda staged: shutil.copyfile(lib, staged))
        print(f"tcmalloc: {deb.name} -> {dest_dir / LIBRARY}")
    return dest_dir / LIBRARY


def main() -> int:
    found = find_tcmalloc()
    if found is not None:
        print(f"tcmalloc: using {found}")
        return 0
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        print("tcmalloc: no apt-get/dpkg-deb here; training uses glibc malloc (slower, more memory)")
        return 0
    try:
        fetch(venv_native_dir())
    except (subprocess.CalledProcessError, StopIteration, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        print(f"tcmalloc: could not fetch {PACKAGE} ({detail.decode(errors='replace').strip() or error}); "
              "training uses glibc malloc (slower, more memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

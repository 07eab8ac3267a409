"""Output folders that do not outlive a failed run.

```python
with fresh_folder(Path("runs/cv")) as out:   # created here (or already there)
    ...                                      # an exception removes it again if this call created it
```
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["fresh_folder"]


@contextlib.contextmanager
def fresh_folder(path: str | Path, enabled: bool = True) -> Iterator[Path]:
    """Create ``path`` (with parents) and yield it; remove it with everything in it when the block raises
    and this call created it. A folder that existed before is never removed.

    Args:
        path: The output folder.
        enabled: False: neither create nor remove (e.g. non-master processes of a distributed run).
    """
    folder = Path(path)
    created = enabled and not folder.exists()
    if enabled:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except Exception:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise

"""Child process of ``tests/test_multiprocess.py``: holds a directory's change lock until killed.

``python tests/lock_holder_child.py ROOT PATH`` opens ``Workspace([ROOT]).atomic_writer(PATH)``
(which holds the change lock of PATH's directory for the whole block), writes a few bytes into
its temp file, prints ``holding`` and then sleeps forever inside the block. The parent SIGKILLs
it; the kernel must then release the lock, since the process never gets to release it itself.
"""

from __future__ import annotations

import sys

import anyio

from atomictools import Workspace

CONTENT = b"written by the lock holder, never committed\n"


async def main(root: str, path: str) -> None:
    async with Workspace([root]).atomic_writer(path) as writer:
        await writer.write(CONTENT)
        print("holding", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])

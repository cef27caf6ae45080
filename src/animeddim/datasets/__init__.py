"""Built-in and paper datasets: DiceBear avatars, user-downloaded archives, Oxford flowers.

Every maker here writes a plain folder of square RGB PNGs plus a ``manifest.json`` that says
how it was made, so :func:`animeddim.data.load_folder` can train on it like any other folder.
Decoding and cropping reuse :mod:`animeddim.data`; nothing is duplicated.

The makers, one module each: :mod:`.avatars` (the built-in DiceBear avatars),
:mod:`.preparation` (an archive or folder, read by :mod:`.archives`, made square), and
:mod:`.flowers` (the Oxford 102 flowers, downloaded, then prepared); and :mod:`.split`,
which moves a held-out set out of any of their folders.
"""

from .archives import MAX_MEMBER_BYTES
from .avatars import AVATAR_STYLE, avatar_seed, generate_avatars
from .flowers import FLOWERS102_MD5, FLOWERS102_URL, download_flowers102
from .preparation import prepare, prepared_notes
from .split import split_held_out

__all__ = [
    "AVATAR_STYLE",
    "FLOWERS102_MD5",
    "FLOWERS102_URL",
    "MAX_MEMBER_BYTES",
    "avatar_seed",
    "download_flowers102",
    "generate_avatars",
    "prepare",
    "prepared_notes",
    "split_held_out",
]

"""How the program's messages say a count: "1 image", "2 images" (never "1 images").

No imports: any module, the CLI's parser included, may use it.
"""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, plural unless `n` is 1: ``counted(1, "image") == "1 image"``,
    ``counted(0, "ddim step") == "0 ddim steps"``, ``counted(2, "batch", "batches")``.

    :param plural: the plural when it is not `noun` + "s".
    """
    return f"{n} {noun if n == 1 else plural or noun + 's'}"

"""The real folder's standard features under torchrun: computed once, by every process.

On a cache miss each process measures a contiguous block of the folder's files and process
0 gathers the blocks and writes the cache, as one process would (the features may differ
by float rounding alone: other batches). This needs every process to see the same folder,
which holds on one machine; on nodes without shared storage the folder may be missing, or
be another copy, on some of them: then process 0 measures it alone, as in one process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed, metrics
from .core import Progress, _stage


def real_folder_features(
    real: str | Path,
    extractor: metrics.FeatureExtractor,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> torch.Tensor | None:
    """Standard-protocol features of `real` ([N x D] float64, sorted file order; cached on
    disk), on process 0; None on the other processes. Every process must call it.

    Process 0 alone reads the cache (and finds its key). On a miss the processes compare
    what they list of the folder (each file's relative path, size and modification time):
    if every one lists what process 0 lists, each measures its block; if not (a node
    without the folder, or with another copy), process 0 measures it whole. An error (too
    few images, two sizes) is raised on every process.

    :param progress: told (stage, images done, images to do): the stage "features (real)"
        for the whole folder; for a block, "features (real, process R's K of N)", counting
        the K images of this process's block (no process knows how far the others are).
    """
    plan: list[metrics.FolderPlan] = []

    def look() -> list | None:  # on process 0: None on a cache hit, else what it lists
        plan.append(metrics.plan_folder(Path(real), extractor, "standard", cache_dir))
        hit = metrics.cached_features(plan[0])
        plan.append(hit)
        if hit is not None:
            return None
        # one process compares with no other: its files are not listed again
        return _listed(plan[0].folder, plan[0].files) if distributed.world_size() > 1 else []

    listed = distributed.from_main(look)
    if listed is None:  # a cache hit
        return plan[1][0] if plan else None
    # process 0 compares what it listed (in `look`) rather than listing the folder again
    own = listed if distributed.is_main() else _own_listing(real)
    shared = distributed.world_size() > 1 and distributed.all_true(own == listed)
    if not shared:  # one process, or a folder some process does not see as process 0 does

        def whole() -> torch.Tensor:
            stage = _stage(progress, "features (real)")
            block = metrics.block_features(plan[0].folder, plan[0].files, extractor,
                                           progress=stage)  # fmt: skip
            return metrics.finish_features(plan[0], extractor, [block], block.features)[0]

        return distributed.on_main(whole)
    folder = Path(real)
    files = [folder / name for name, _, _ in listed]
    lo, hi = distributed.shard(len(files))
    share = f"features (real, process {distributed.rank()}'s {hi - lo} of {len(files)})"
    stage = _stage(progress, share)
    block = distributed.on_every(
        lambda: metrics.block_features(folder, files[lo:hi], extractor, progress=stage)
    )
    blocks = distributed.all_gather_object(
        metrics.Block(torch.empty(0), block.first, block.skipped, block.unconverted)
    )
    width = max(distributed.all_gather_object(block.features.shape[1]))  # 0 if none usable
    mine = block.features if len(block.features) else torch.empty(0, width, dtype=torch.float64)
    features = distributed.gather_to_main(mine)
    return distributed.on_main(
        lambda: metrics.finish_features(plan[0], extractor, blocks, features)[0]
    )


def _listed(folder: Path, files: list[Path]) -> list[tuple[str, int, int]]:
    """Each file's path relative to `folder`, size and modification time (ns)."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((f.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
        except OSError:  # unreadable: skipped when measured, by whichever process reads it
            out.append((f.relative_to(folder).as_posix(), -1, -1))
    return out


def _own_listing(real: str | Path) -> list[tuple[str, int, int]] | None:
    """What this process lists of `real` (None where it cannot list it: another node's
    file system). Lists only: no image is read, nothing noted."""
    from ..data import list_images

    try:
        return _listed(Path(real), list(list_images(Path(real)).files))
    except Exception:  # noqa: BLE001 - any failure: this process cannot share the work
        return None

"""Config and checkpoint: round trips and clear errors."""

from __future__ import annotations

import pytest
import torch

from animeddim import checkpoint as ckpt
from animeddim.config import ConfigError, RunConfig
from animeddim.unet import UNet


def test_config_roundtrip_and_errors():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown setting"):
        RunConfig.from_dict({"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match="epochs"):
        RunConfig.from_dict({"train": {"epochs": "many"}})
    bad = RunConfig.from_dict({"data": {"image_size": 20}, "model": {"image_size": 20}})
    with pytest.raises(ConfigError, match="multiple of 8"):
        bad.validate()


def _tiny_checkpoint(path, cfg: RunConfig):
    model = UNet(cfg.model)
    tensors = {
        **ckpt.with_prefix(model.state_dict(), "ema"),
        "norm.mean": torch.zeros(3),
        "norm.std": torch.ones(3),
    }
    return ckpt.save(path, tensors, {"config": cfg.to_dict(), "epoch": 0, "step": 0})


def test_checkpoint_roundtrip_and_atomic_write(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
        }
    )
    f = _tiny_checkpoint(tmp_path / "c.safetensors", cfg)
    loaded = ckpt.load_model(f)
    assert loaded.config == cfg
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_bad_checkpoints_are_clear_errors(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
        }
    )
    f = _tiny_checkpoint(tmp_path / "c.safetensors", cfg)
    data = f.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="not a readable"):
        ckpt.load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(tmp_path / "text.safetensors")
    # Another architecture: the config says widths [8, 16] but weights are for [8, 32].
    other = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 32], "block_depth": 1, "embedding_dims": 8},
        }
    )
    tensors, meta = ckpt.load(_tiny_checkpoint(tmp_path / "o.safetensors", other))
    meta["config"] = cfg.to_dict()
    ckpt.save(tmp_path / "mismatch.safetensors", tensors, meta)
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_model(tmp_path / "mismatch.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_model(tmp_path)


def test_pickle_checkpoint_runs_no_code(tmp_path):
    """A pickle whose payload would create a file is refused without running it."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(bad)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_loaded_model_owns_its_tensors_when_the_file_is_rewritten_in_place(tmp_path):
    """A model file rewritten in place (same inode: `cp` over it) while a model loaded from it
    is in use leaves the loaded model as it was: nothing still reads the file's pages."""
    cfg = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
        }
    )
    f = _tiny_checkpoint(tmp_path / "c.safetensors", cfg)
    loaded = ckpt.load_model(f)
    mean, std = loaded.mean.clone(), loaded.std.clone()
    params = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    # Another model whose metadata is longer: every tensor sits at another offset.
    other = RunConfig.from_dict({**cfg.to_dict(), "train": {"epochs": 7}})
    tensors, meta = ckpt.load(_tiny_checkpoint(tmp_path / "o.safetensors", other))
    tensors["norm.mean"], tensors["norm.std"] = torch.full((3,), 9.0), torch.full((3,), -9.0)
    meta["padding"] = "x" * 1001
    ckpt.save(tmp_path / "n.safetensors", tensors, meta)
    with open(f, "r+b") as out:  # in place, as cp does
        out.write((tmp_path / "n.safetensors").read_bytes())
        out.truncate()
    assert torch.equal(loaded.mean, mean) and torch.equal(loaded.std, std)
    assert all(torch.equal(v, params[k]) for k, v in loaded.model.state_dict().items())
    assert ckpt.load_model(f).mean.tolist() == [9.0] * 3  # a new load reads the new file


def test_a_truncated_checkpoint_is_refused_even_when_only_its_header_is_read(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "data": {"image_size": 16},
            "model": {"image_size": 16, "widths": [8, 16], "block_depth": 1, "embedding_dims": 8},
        }
    )
    data = _tiny_checkpoint(tmp_path / "c.safetensors", cfg).read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-5])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.read_meta(tmp_path / "t.safetensors")

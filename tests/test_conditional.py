"""Attribute-conditional networks: the zero start, the training-time drop, classifier-free
guidance, and sample/edit/train through the CLI on a tiny two-class folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, run_cli, run_here, shared_dir
from PIL import Image

from animeddim import checkpoint as ckpt
from animeddim.conditioning import NULL, UnknownAttribute, drop_attributes, drop_generator, encode
from animeddim.config import (
    ConfigError,
    ScheduleConfig,
    UNetConfig,
    check_guidance_interval,
    guidance_interval_text,
    parse_guidance_interval,
)
from animeddim.diffusion.guidance import Guided, guided
from animeddim.diffusion.samplers import SAMPLERS, sample
from animeddim.unet import UNet, fold_batchnorm, is_cond_parameter

VOCAB = {"hair": ["long", "short"], "glasses": ["no", "yes"], "mouth": ["a", "b", "c"]}
COLOURS = {"blue": (30, 30, 230), "red": (230, 30, 30)}


def _trained_unconditional() -> UNet:
    """A tiny unconditional network whose output is not zero (its head is trained)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY_MODEL))
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
        for block in net.modules():
            if isinstance(block, torch.nn.BatchNorm2d):
                block.running_mean.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize("cond_at", ["blocks", "input", "both"])
def test_conditional_network_from_unconditional_weights_gives_the_same_output(cond_at):
    source = _trained_unconditional()
    net = UNet(UNetConfig(**TINY_MODEL, vocabulary=VOCAB, cond_at=cond_at)).eval()
    # As `train --init` loads: the conditioning parameters may be missing from the source.
    ckpt.load_state_strict(net, source.state_dict(), "the source", is_cond_parameter)
    added = [k for k in net.state_dict() if k not in source.state_dict()]
    assert added and all(is_cond_parameter(k) for k in added)
    x, v = torch.randn(5, 3, 16, 16), torch.rand(5)
    codes = torch.tensor([[0, 1, 2], [1, NULL, 0], [NULL, NULL, NULL], [0, 0, 0], [1, 1, 1]])
    with torch.no_grad():
        expected = source(x, v)
        assert expected.abs().max() > 0.01
        assert torch.equal(net(x, v, codes), expected)
        assert torch.equal(net(x, v, None), expected)
        # The BatchNorm-folded inference copy keeps the conditioning path.
        folded = fold_batchnorm(net)
        torch.testing.assert_close(folded(x, v, codes), expected, atol=1e-5, rtol=1e-5)


def test_missing_parameters_other_than_conditioning_are_still_an_error():
    source = _trained_unconditional().state_dict()
    source.pop("head.weight")
    net = UNet(UNetConfig(**TINY_MODEL, vocabulary=VOCAB))
    with pytest.raises(ckpt.CheckpointError, match="head.weight"):
        ckpt.load_state_strict(net, source, "the source", is_cond_parameter)


def test_the_condition_changes_the_output_once_projections_are_trained():
    net = UNet(UNetConfig(**TINY_MODEL, vocabulary=VOCAB)).eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
        for name, p in net.named_parameters():
            if ".cond_proj." in name:
                p.normal_(0, 0.1)
    x, v = torch.randn(2, 3, 16, 16), torch.rand(2)
    a = net(x, v, torch.tensor([[0, 0, 0], [0, 0, 0]]))
    b = net(x, v, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])  # per image
    torch.testing.assert_close(net(x, v, None), net(x, v, torch.full((2, 3), NULL)))


# --- the training-time drop ---------------------------------------------------------------


def test_cond_drop_statistics():
    codes = torch.zeros(20000, 3, dtype=torch.long)
    p = 0.15
    dropped = drop_attributes(codes, p, drop_generator(0, 0, 0)) == NULL
    n = dropped.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 4 * sd
    for a in range(3):  # every attribute on its own, at the same rate
        col = dropped[:, a].float().mean().item()
        assert abs(col - p) < 4 * (p * (1 - p) / len(codes)) ** 0.5
    # Independent: both of two attributes dropped with probability p**2.
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()
    assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / len(codes)) ** 0.5
    assert not (drop_attributes(codes, 0.0, drop_generator(0, 0, 0)) == NULL).any()
    assert (drop_attributes(codes, 1.0, drop_generator(0, 0, 0)) == NULL).all()


def test_cond_drop_is_a_function_of_seed_epoch_batch_and_not_of_the_process_split():
    codes = torch.arange(8 * 2).view(8, 2)
    whole = drop_attributes(codes, 0.5, drop_generator(3, 1, 4))
    assert torch.equal(whole, drop_attributes(codes, 0.5, drop_generator(3, 1, 4)))
    assert not torch.equal(whole, drop_attributes(codes, 0.5, drop_generator(3, 1, 5)))
    assert not torch.equal(whole, drop_attributes(codes, 0.5, drop_generator(3, 2, 4)))
    halves = [
        drop_attributes(
            codes[lo : lo + 4], 0.5, drop_generator(3, 1, 4), global_rows=8, first_row=lo
        )
        for lo in (0, 4)
    ]
    assert torch.equal(torch.cat(halves), whole)
    kept = whole != NULL
    assert torch.equal(whole[kept], codes[kept])


# --- classifier-free guidance ---------------------------------------------------------------


class Toy:
    """eps = 0.1 x + 0.05 * v * (1 + code sum over asked attributes); records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, v, cond=None):
        self.calls.append((x.shape[0], None if cond is None else cond.clone()))
        if cond is None:
            k = torch.zeros(x.shape[0], dtype=x.dtype)
        else:
            k = torch.where(cond >= 0, cond + 1, 0).sum(1).to(x.dtype)
        return 0.1 * x + 0.05 * (v * (1 + k)).view(-1, 1, 1, 1) * torch.ones_like(x)


class HandGuided:
    """The guidance formula with two separate calls, in float64; with an interval (lo, hi],
    w applies where lo < sigma = sqrt(v / (1 - v)) <= hi and 1 elsewhere."""

    def __init__(self, w, interval=(0.0, math.inf), per_attribute=None):
        self.toy, self.w, self.interval = Toy(), w, interval
        self.per_attribute = per_attribute or {}

    def __call__(self, x, v, cond=None):
        x64, v64 = x.double(), v.double()
        eps_c = self.toy(x64, v64, cond)
        eps_n = self.toy(x64, v64, torch.full_like(cond, NULL))
        sigma = (v64 / (1 - v64)).sqrt()
        lo, hi = self.interval
        inside = ((sigma > lo) & (sigma <= hi)).view(-1, 1, 1, 1)
        out = eps_n + torch.where(inside, self.w, 1.0) * (eps_c - eps_n)
        for a, wa in self.per_attribute.items():  # attribute a's part weighted wa, not w
            rest = cond.clone()
            rest[:, a] = NULL
            out = out + torch.where(inside, wa - self.w, 0.0) * (eps_c - self.toy(x64, v64, rest))
        return out.float()


def test_guidance_formula_by_hand_and_one_batched_call():
    x, v = torch.randn(3, 3, 4, 4), torch.tensor([0.2, 0.5, 0.9])
    cond = torch.tensor([[1, NULL], [0, 2], [NULL, NULL]])
    toy = Toy()
    out = Guided(toy, 3.0)(x, v, cond)
    assert [c[0] for c in toy.calls] == [6]  # one call of both halves
    assert torch.equal(toy.calls[0][1], torch.cat([cond, torch.full_like(cond, NULL)]))
    # By hand: the sums of (code + 1) are 2, 4, 0; the null half has 0; w = 3.
    k = torch.tensor([2.0, 4.0, 0.0])
    eps_null = 0.1 * x + 0.05 * v.view(-1, 1, 1, 1)
    eps_cond = 0.1 * x + 0.05 * (v * (1 + k)).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, eps_null + 3.0 * (eps_cond - eps_null))
    # w = 1: conditional, one call of N; no condition: unconditional, one call with None.
    toy = Toy()
    torch.testing.assert_close(Guided(toy, 1.0)(x, v, cond), eps_cond)
    assert [c[0] for c in toy.calls] == [3]
    toy = Toy()
    torch.testing.assert_close(Guided(toy, 3.0)(x, v, None), 0.1 * x + 0.05 * v.view(-1, 1, 1, 1))
    assert toy.calls[0][1] is None
    toy = Toy()  # w = 0: the null model
    torch.testing.assert_close(Guided(toy, 0.0)(x, v, cond), eps_null)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_every_sampler_with_guidance_matches_the_hand_computation(name, w):
    sched = ScheduleConfig()
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([[1, NULL], [0, 2], [NULL, 1]])
    eta = 0.0
    got = sample(Guided(Toy(), w), noise, 6, sched, sampler=name, eta=eta, cond=cond)
    want = sample(HandGuided(w), noise, 6, sched, sampler=name, eta=eta, cond=cond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_guidance_interval_guides_only_the_noise_levels_inside_it():
    # v = 0.2, 0.5, 0.9 are sigma = 0.5, 1 and 3; (1, inf] holds only the last
    x, v = torch.randn(3, 3, 4, 4), torch.tensor([0.2, 0.5, 0.9])
    cond = torch.tensor([[1, NULL], [0, 2], [1, 1]])
    toy = Toy()
    got = Guided(toy, 3.0, (1.0, math.inf))(x, v, cond)
    assert [c[0] for c in toy.calls] == [6]
    torch.testing.assert_close(got, HandGuided(3.0, (1.0, math.inf))(x, v, cond))
    plain = Toy()(x, v, cond)
    torch.testing.assert_close(got[:2], plain[:2])  # outside: plain conditional
    assert not torch.allclose(got[2], plain[2])
    # nothing inside: one plain call of N; all inside: the usual guidance
    toy = Toy()
    torch.testing.assert_close(Guided(toy, 3.0, (5.0, 9.0))(x, v, cond), plain)
    assert [c[0] for c in toy.calls] == [3]
    torch.testing.assert_close(
        Guided(Toy(), 0.0, (0.1, 4.0))(x, v, cond), Guided(Toy(), 0.0)(x, v, cond)
    )


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_with_a_guidance_interval_matches_the_hand_computation(name):
    sched = ScheduleConfig()
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([[1, NULL], [0, 2], [NULL, 1]])
    interval = (1.0, 10.0)  # 6 steps from sigma 50 down: some outside on both sides
    got = sample(Guided(Toy(), 2.5, interval), noise, 6, sched, sampler=name, cond=cond)
    want = sample(HandGuided(2.5, interval), noise, 6, sched, sampler=name, cond=cond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    always = sample(Guided(Toy(), 2.5), noise, 6, sched, sampler=name, cond=cond)
    assert not torch.allclose(got, always)


def test_per_attribute_weight_by_hand_in_one_batched_call():
    x, v = torch.randn(3, 3, 4, 4), torch.tensor([0.2, 0.5, 0.9])
    cond = torch.tensor([[1, NULL], [0, 2], [NULL, 1]])
    toy = Toy()
    out = Guided(toy, 3.0, per_attribute={1: 7.0})(x, v, cond)
    rest = cond.clone()
    rest[:, 1] = NULL
    assert [c[0] for c in toy.calls] == [9]  # cond, null and cond without attribute 1
    assert torch.equal(toy.calls[0][1], torch.cat([cond, torch.full_like(cond, NULL), rest]))

    # By hand: code sums (code + 1) 2, 4, 2 asked; 2, 1, 0 without attribute 1; 0 null.
    def eps(k):
        return 0.1 * x + 0.05 * (v * (1 + torch.tensor(k))).view(-1, 1, 1, 1)

    e_c, e_r, e_n = eps([2.0, 4.0, 2.0]), eps([2.0, 1.0, 0.0]), eps([0.0, 0.0, 0.0])
    torch.testing.assert_close(out, e_n + 3.0 * (e_c - e_n) + 4.0 * (e_c - e_r))
    # an image that does not ask attribute 1 is guided as with w alone
    torch.testing.assert_close(out[0], Guided(Toy(), 3.0)(x, v, cond)[0])
    # the weight of the others is w: attribute 1 alone at 7 is w = 7 for an image asking only it
    torch.testing.assert_close(out[2], Guided(Toy(), 7.0)(x, v, cond)[2])
    # a per-attribute weight equal to w changes nothing and costs nothing
    toy = Toy()
    torch.testing.assert_close(
        Guided(toy, 3.0, per_attribute={1: 3.0})(x, v, cond), e_n + 3.0 * (e_c - e_n)
    )
    assert [c[0] for c in toy.calls] == [6]
    # w = 1 with one attribute weighted still guides that attribute
    torch.testing.assert_close(
        Guided(Toy(), 1.0, per_attribute={0: 4.0})(x, v, cond),
        HandGuided(1.0, per_attribute={0: 4.0})(x, v, cond),
    )
    assert guided(toy, 1.0, per_attribute={0: 1.0}) is toy  # nothing to combine
    # an attribute no image asks costs nothing: one call of 2 N, as w alone
    unasked = torch.tensor([[1, NULL], [0, NULL], [NULL, NULL]])
    toy = Toy()
    out = Guided(toy, 3.0, per_attribute={1: 7.0})(x, v, unasked)
    assert [c[0] for c in toy.calls] == [6]
    torch.testing.assert_close(out, Guided(Toy(), 3.0)(x, v, unasked))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_with_per_attribute_weights_matches_the_hand_computation(name):
    sched = ScheduleConfig()
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([[1, NULL], [0, 2], [NULL, 1]])
    interval, weights = (1.0, 10.0), {0: 5.0, 1: 0.5}
    got = sample(Guided(Toy(), 2.5, interval, weights), noise, 6, sched, sampler=name, cond=cond)
    want = sample(HandGuided(2.5, interval, weights), noise, 6, sched, sampler=name, cond=cond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        got, sample(Guided(Toy(), 2.5, interval), noise, 6, sched, sampler=name, cond=cond)
    )


def test_guidance_interval_text_and_its_errors():
    assert parse_guidance_interval("1,inf") == (1.0, math.inf)
    assert parse_guidance_interval(" 0.5 , 6 ") == (0.5, 6.0)
    assert guidance_interval_text((1.0, math.inf)) == "1,inf"
    for bad in ("1", "a,b", "1,2,3", ""):
        with pytest.raises(ConfigError, match="a guidance interval is LO,HI in sigma"):
            parse_guidance_interval(bad)
    for bad in ("2,1", "-1,3", "1,1", "nan,1", "0,nan"):
        with pytest.raises(ConfigError, match="needs 0 <= LO < HI"):
            parse_guidance_interval(bad)
    assert check_guidance_interval((0, math.inf)) == (0.0, math.inf)


def test_unknown_attribute_and_value_name_the_known_ones():
    with pytest.raises(UnknownAttribute, match="knows no attribute 'hat'.*'hair', 'glasses', 'mo"):
        encode(VOCAB, {"hat": "yes"})
    with pytest.raises(UnknownAttribute, match="no glasses value 'maybe'.*'no', 'yes'"):
        encode(VOCAB, {"glasses": "maybe"})
    assert encode(VOCAB, {"mouth": "c"}).tolist() == [NULL, NULL, 2]


def test_known_values_holding_a_comma_are_listed_unambiguously(tmp_path):
    """A value may hold a comma ('red, dark'): joined plainly, 'known: red, red, dark' read as
    three values. Each listed name and value is quoted."""
    from animeddim.labels import LabelError, csv_labels, quoted

    assert quoted(["red", "red, dark"]) == "'red', 'red, dark'"
    vocab = {"hair, colour": ["red", "red, dark"]}
    with pytest.raises(UnknownAttribute) as e:
        encode(vocab, {"hair, colour": "dark"})
    assert str(e.value).endswith("known hair, colour values: 'red', 'red, dark'")
    with pytest.raises(UnknownAttribute) as e:
        encode(vocab, {"hair": "red"})
    assert str(e.value).endswith("known attributes: 'hair, colour'")
    for f in ("a.png", "b.png"):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f)
    labels = tmp_path / "labels.csv"
    labels.write_text('file,"hair, colour"\na.png,"red, dark"\nb.png,dark\n', encoding="utf-8")
    paths = [str(tmp_path / "img" / f) for f in ("a.png", "b.png")]
    with pytest.raises(LabelError) as e:
        csv_labels(labels, tmp_path / "img", paths, vocab=vocab)
    assert str(e.value).endswith("unknown hair, colour value 'dark'; known: 'red', 'red, dark'")
    with pytest.raises(LabelError) as e:
        csv_labels(labels, tmp_path / "img", paths, vocab={"hair": ["red"]})
    assert str(e.value).endswith("has no column for 'hair'")


def test_a_labels_csv_saved_by_a_spreadsheet_in_other_ways_says_how_to_save_it(tmp_path):
    """A spreadsheet in a language whose decimal mark is a comma saves CSV with ';' between
    columns (before: `has no attribute columns after the file column`, the whole header read
    as one column's name); one saved in a legacy encoding was refused with no remedy, and an
    archive given as the labels file (`--labels data.zip`) was said to be text in another
    encoding."""
    import zipfile

    from animeddim.labels import LabelError, read_csv_rows

    rows = [["file", "colour", "pet"], ["a.png", "red", "cat"]]
    for sep, shown in ((";", "';'"), ("\t", "'\\t'"), ("|", "'|'")):
        labels = tmp_path / "labels.csv"
        labels.write_text("".join(sep.join(r) + "\r\n" for r in rows), encoding="utf-8-sig")
        with pytest.raises(LabelError) as e:
            read_csv_rows(labels)
        assert str(e.value) == (
            f"labels file '{labels}' separates its columns with {shown}, not commas; save it "
            "with commas (file,attribute,...)"
        )
    labels.write_text("file\na.png\n")  # a file column alone: nothing to say of separators
    with pytest.raises(LabelError, match="has no attribute columns after the file column$"):
        read_csv_rows(labels)
    labels.write_bytes("file,colour\nb\xe4r.png,red\n".encode("latin-1"))
    with pytest.raises(LabelError) as e:
        read_csv_rows(labels)
    assert str(e.value) == (
        f"labels file '{labels}' is not UTF-8 text; save it as UTF-8 (a spreadsheet's 'CSV UTF-8')"
    )
    # a spreadsheet's "Unicode text" (UTF-16, tabs): the encoding is said first
    labels.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-16")
    with pytest.raises(LabelError, match="is not UTF-8 text; save it as UTF-8"):
        read_csv_rows(labels)
    with zipfile.ZipFile(labels, "w") as z:  # an archive, not text at all
        z.writestr("labels.csv", "file,colour\na.png,red\n")
    with pytest.raises(LabelError) as e:
        read_csv_rows(labels)
    assert str(e.value) == f"labels file '{labels}' is not a text file (a CSV: file,attribute,...)"
    labels.write_text("".join(",".join(r) + "\r\n" for r in rows), encoding="utf-8-sig")
    assert read_csv_rows(labels) == (["colour", "pet"], [(2, "a.png", ["red", "cat"])])


def test_one_text_in_two_unicode_spellings_is_one_value(tmp_path):
    """A class folder named on macOS spells 'grün' decomposed (u + U+0308); the 'grün' typed
    at a prompt is composed. Labels are read in NFC, --attr is parsed in NFC, and a
    vocabulary stored in either form matches either."""
    from animeddim.conditioning import parse_assignments
    from animeddim.labels import folder_labels

    composed, decomposed = "gr\u00fcn", "gru\u0308n"
    for name in (f"{decomposed}/a.png", "red/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    paths = [f"{decomposed}/a.png", "red/b.png"]
    labels = folder_labels(tmp_path, paths)
    assert labels.vocab == {"class": (composed, "red")}
    old = {"class": (decomposed, "red")}  # a model trained before keeps its spelling
    assert folder_labels(tmp_path, paths, vocab=old).codes[:, 0].tolist() == [0, 1]
    assert parse_assignments([f"class={decomposed}"]) == {"class": composed}
    for vocab in (labels.vocab, old):
        for value in (composed, decomposed):
            assert encode(vocab, {"class": value}).tolist() == [0]
    with pytest.raises(UnknownAttribute, match="no class value 'gruen'; known class values: 'gr"):
        encode(old, {"class": "gruen"})


def test_a_labels_csv_typed_in_nfc_labels_files_named_in_nfd(tmp_path, capsys):
    """macOS writes 'grün.png' decomposed (u + U+0308); a labels CSV typed at a keyboard holds
    it composed. `train --labels` said "'grün.png' is not a file in 'nfd'"; the file column is
    matched in NFC (so are edit --labels, coverage, attributes train: all read through
    csv_labels, and evaluate --attr's real images). A typo is still refused, a skipped file
    named either way is still a file, and one image labelled in both spellings is an error."""
    from conftest import run_main

    from animeddim.labels import LabelError, canonical, csv_labels
    from animeddim.pipelines.control import _files_with

    data = tmp_path / "nfd"
    (data / "sub\u0308").mkdir(parents=True)
    names = [f"gru\u0308n{i}.png" for i in range(4)] + [
        f"sub\u0308/ro\u0308t{i}.png" for i in range(4)
    ]
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (30 * i, 100, 200)).save(data / name)
    (data / "bla\u0308u.png").write_bytes(b"not an image")  # skipped as unreadable
    composed = [canonical(n) for n in names]
    assert (
        all(c != n for c, n in zip(composed, names, strict=True))
        and not (data / composed[0]).exists()
    )
    rows = ["file,colour"] + [f"{c},{('red', 'blue')[i % 2]}" for i, c in enumerate(composed)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([*rows, "bl\u00e4u.png,red"]) + "\n", encoding="utf-8")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "data": {"val_fraction": 0.25}}))
    rc, _, err = run_main(capsys, "train", "--data", data, "--out", tmp_path / "run", "--config",
                          cfg, "--labels", labels, "--max-steps", 1, "--no-kid", "--quiet",
                          "--device", "cpu", "--batch-size", 2)  # fmt: skip
    assert rc == 0, err
    assert "is not a file" not in err

    paths = [data / n for n in names]
    got = csv_labels(labels, data, paths)
    assert got.vocab == {"colour": ("blue", "red")}
    assert got.column("colour").tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    blue = _files_with(data, labels, {"colour": "blue"})
    assert [p.relative_to(data).as_posix() for p in blue] == names[1::2]
    labels.write_text("\n".join([*rows, "gr\u00fcnx.png,red"]) + "\n", encoding="utf-8")
    with pytest.raises(LabelError, match="row 10: 'gr\u00fcnx.png' is not a file in"):
        csv_labels(labels, data, paths)
    labels.write_text("\n".join([*rows, f"{names[0]},blue"]) + "\n", encoding="utf-8")
    twice = r"row 10: 'gru\u0308n0.png' is already labelled in row 2 \(as 'gr\u00fcn0.png', the"
    with pytest.raises(LabelError, match=twice):
        csv_labels(labels, data, paths)


def _loaded_with(vocab: dict) -> ckpt.LoadedModel:
    """A loaded model of which only the vocabulary is read (the label-reading functions)."""
    from types import SimpleNamespace

    config = SimpleNamespace(model=SimpleNamespace(vocabulary=vocab))
    return ckpt.LoadedModel(None, config, None, None, {}, Path("model.safetensors"))


def test_a_vocabulary_with_a_decomposed_attribute_name_still_reads_its_labels(tmp_path):
    """A run from before NFC reading stored its CSV header as written ('fa' + U+0308 + 'rbe');
    the header is now read as 'färbe' composed. Resuming (csv_labels under the stored
    vocabulary), --attrs-from FILE.csv and edit --labels still find that column (they said
    'has no column for färbe', 'none of the model's attributes', or left every code null)."""
    from animeddim.labels import csv_labels
    from animeddim.pipelines.conditional import _image_codes, codes_from_labels

    name, green = "fa\u0308rbe", "gru\u0308n"
    for f in ("a.png", "b.png"):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"file,{name}\na.png,rot\nb.png,{green}\n", encoding="utf-8")
    vocab = {name: [green, "rot"]}  # config.json of the older run
    paths = [str(tmp_path / "img" / f) for f in ("a.png", "b.png")]
    got = csv_labels(labels, tmp_path / "img", paths, vocab=vocab)
    assert got.codes[:, 0].tolist() == [1, 0] and list(got.vocab) == [name]
    loaded = _loaded_with(vocab)
    assert codes_from_labels(loaded, labels)[:, 0].tolist() == [1, 0]
    codes = _image_codes(loaded, tmp_path / "img", paths, str(labels))
    assert codes[:, 0].tolist() == [1, 0]


# --- through the CLI, as a user would ------------------------------------------------------


def _colour_folder(root: Path, per_class: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for cls, col in COLOURS.items():
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            im = np.array(col)[None, None, :] + rng.normal(0, 10, (16, 16, 3))
            Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def _means(folder: Path) -> np.ndarray:
    """Mean (R, G, B) of the PNGs of a folder."""
    ims = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(folder.glob("*.png"))]
    assert ims
    return np.stack(ims).mean(axis=(0, 1, 2))


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory) -> tuple[Path, Path]:
    """A conditional tiny model trained with `--labels folders` on red and blue images."""
    tmp = shared_dir(tmp_path_factory, "colours", _train_colours)
    return tmp / "run", tmp / "data"


def _train_colours(tmp: Path) -> Path:
    data = _colour_folder(tmp / "data")
    cfg = tmp / "tiny.json"
    # A fast EMA: the run is 80 steps long.
    settings = {"model": TINY_MODEL, "data": {"val_fraction": 0.1}, "train": {"ema_decay": 0.9}}
    cfg.write_text(json.dumps(settings))
    run = tmp / "run"
    run_cli(
        *("train", "--data", str(data), "--out", str(run), "--config", str(cfg)),
        *("--labels", "folders", "--epochs", "8", "--batch-size", "8", "--lr", "3e-3"),
        *("--no-kid", "--quiet", "--precision", "fp32", "--device", "cpu"),
        timeout=600,
    )
    return tmp


def test_labels_folders_trains_a_model_that_samples_each_class(colour_run, tmp_path):
    run, _ = colour_run
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vocabulary"] == {"class": ["blue", "red"]}
    _, meta = ckpt.load(run / "checkpoints" / "last.safetensors")
    assert meta["config"]["model"]["vocabulary"] == {"class": ["blue", "red"]}
    for cls in COLOURS:
        out = tmp_path / cls
        run_here(
            "sample",
            "--run",
            str(run),
            "--attr",
            f"class={cls}",
            "--guidance",
            "3",
            "--n",
            "6",
            "--steps",
            "10",
            "--out",
            str(out),
            "--device",
            "cpu",
        )
        r, _, b = _means(out)
        assert (r > b + 80) if cls == "red" else (b > r + 80), (cls, r, b)


def test_attrs_from_training_of_a_folders_model_reads_its_class_folders(colour_run, tmp_path):
    """A `--labels folders` run has no labels CSV: its training labels are the class folders
    of its training folder, for `sample --attrs-from training` and for an export to keep."""
    import shutil

    from animeddim import pipelines
    from animeddim.pipelines.conditional import _folder_rows

    run, data = colour_run
    loaded = pipelines.load_for_sampling(run, None, "cpu")[0]
    assert pipelines.training_rows(loaded)[:, 0].tolist() == [0] * 48 + [1] * 48  # blue, red
    exported = tmp_path / "classes.safetensors"
    p = run_here("export", "--run", str(run), "--out", str(exported))
    assert "with the 96 rows of its training labels" in p.stdout and "note" not in p.stdout
    p = run_here("sample", "--run", str(exported), "--attrs-from", "training", "--n", "2",
                 "--steps", "2", "--out", str(tmp_path / "s"), "--device", "cpu")  # fmt: skip
    assert "96 rows of the model's training labels" in p.stdout
    grown = tmp_path / "grown"  # a class added to the folder since: named, with the known ones
    shutil.copytree(data, grown)
    shutil.copytree(grown / "red", grown / "green")
    with pytest.raises(UnknownAttribute, match="class folder 'green' .*known class values: 'blue'"):
        _folder_rows(loaded, grown)


def test_attrs_from_training_finds_a_folders_models_data_from_another_directory(
    colour_run, tmp_path, monkeypatch
):
    """`train --data data --labels folders` records data.path 'data' (as typed) and
    data.abs_path; sampling from another directory read 'data' there and said the training
    folder was not at hand. The class folders are read where the run trained."""
    from animeddim import pipelines

    run, data = colour_run
    loaded = pipelines.load_for_sampling(run, None, "cpu")[0]
    assert Path(loaded.config.data.abs_path) == data.resolve()
    loaded.config.data.path = data.name  # relative, as a run started beside its data has it
    monkeypatch.chdir(tmp_path)
    assert pipelines.training_rows(loaded)[:, 0].tolist() == [0] * 48 + [1] * 48


def test_attrs_from_training_reads_an_old_runs_relative_labels_file_where_a_resume_does(
    cond_run, cond_data, tmp_path, monkeypatch
):
    """A run from before labels files were recorded by their absolute place kept `--data data
    --labels data/labels.csv` as given, relative to the directory it started in. `sample
    --attrs-from training` read that path from the working directory ('not at hand' from
    another one, or a same-named file there that labels otherwise), where `train --resume`
    finds the file from the run's data folder (`resume_labels.recorded_place`): both agree."""
    from animeddim import pipelines

    loaded = pipelines.load_for_sampling(cond_run, None, "cpu")[0]
    want = pipelines.codes_from_labels(loaded, cond_data / "labels.csv")
    data = loaded.config.data
    assert Path(data.abs_path) == cond_data.resolve() and cond_data.name == "data"
    data.path, data.labels = "data", "data/labels.csv"  # started beside its data folder
    monkeypatch.chdir(tmp_path)
    assert pipelines.training_rows(loaded).equal(want)
    (tmp_path / "data").mkdir()  # a same-named file here, its first image the other colour
    header, first, *rows = (cond_data / "labels.csv").read_text().splitlines()
    name, colour, band = first.split(",")
    first = ",".join([name, {"red": "blue", "blue": "red"}[colour], band])
    (tmp_path / "data" / "labels.csv").write_text("\n".join([header, first, *rows]) + "\n")
    assert pipelines.training_rows(loaded).equal(want)


def test_grid_by_rows_are_values_and_columns_seeds(colour_run, tmp_path):
    run, _ = colour_run
    grid = tmp_path / "grid.png"
    p = run_here(
        "sample",
        "--run",
        str(run),
        "--grid-by",
        "class",
        "--n",
        "3",
        "--steps",
        "5",
        "--grid",
        str(grid),
        "--device",
        "cpu",
    )
    assert "rows: class = blue, red" in p.stdout
    im = np.asarray(Image.open(grid), dtype=np.float64)
    rows = np.array_split(im, 2, axis=0)
    assert rows[0][..., 2].mean() > rows[0][..., 0].mean() + 50  # blue row
    assert rows[1][..., 0].mean() > rows[1][..., 2].mean() + 50  # red row
    assert im.shape[1] > im.shape[0]  # 3 columns, 2 rows
    # the grid there: refused in one line (before: after the guidance and rows lines, as if
    # it were to be drawn)
    p = run_here("sample", "--run", str(run), "--grid-by", "class", "--n", "3", "--steps", "5",
                 "--grid", str(grid), "--device", "cpu", check=False)  # fmt: skip
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.strip().splitlines() == [
        f"animeddim: error: --grid {str(grid)!r} already exists; use --force to replace it "
        "(or choose another name)"
    ]


def test_edit_turns_red_images_blue(colour_run, tmp_path):
    run, data = colour_run
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((data / "red").glob("*.png"))[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "edited"
    p = run_here(
        "edit",
        "--run",
        str(run),
        "--images",
        str(images),
        "--set",
        "class=blue",
        "--steps",
        "10",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert "3 images edited (class=blue" in p.stdout
    r, _, b = _means(out / "after")
    assert b > r + 80, (r, b)
    pair = np.asarray(Image.open(out / "pairs" / "000.png"))
    assert pair.shape == (16, 32, 3)
    assert (out / "grid.png").is_file()
    # Round trip: editing to the images' own class gives them back (inversion under it).
    again = tmp_path / "same"
    run_here(
        "edit",
        "--run",
        str(run),
        "--images",
        str(images),
        "--set",
        "class=red",
        "--steps",
        "10",
        "--out",
        str(again),
        "--device",
        "cpu",
    )
    # The tiny model saturates colours, so compare: its own class keeps each image red and
    # far closer to the original than the blue edit.
    r, _, b = _means(again / "after")
    assert r > b + 80, (r, b)

    def distance(folder: Path) -> float:
        pairs = [
            (np.asarray(Image.open(images / f.name), float), np.asarray(Image.open(f), float))
            for f in sorted(folder.glob("*.png"))
        ]
        return float(np.mean([np.abs(x - y).mean() for x, y in pairs]))

    assert distance(again / "after") < 0.5 * distance(out / "after")


def test_unknown_attribute_or_value_exits_2_naming_it(colour_run, tmp_path):
    run, _ = colour_run
    cases = (
        ("hat=yes", "no attribute 'hat'", "known attributes: 'class'"),
        ("class=green", "class value 'green'", "known class values: 'blue', 'red'"),
    )
    for attr, needle, known in cases:
        p = run_cli(
            "sample",
            "--run",
            str(run),
            "--attr",
            attr,
            "--out",
            str(tmp_path / "x"),
            "--device",
            "cpu",
            check=False,
        )
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr and known in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    p = run_here(
        "sample",
        "--run",
        str(run),
        "--grid-by",
        "hat",
        "--grid",
        str(tmp_path / "g.png"),
        "--device",
        "cpu",
        check=False,
    )
    assert p.returncode == 2 and "known attributes: 'class'" in p.stderr, p.stderr
    p = run_cli(
        "edit",
        "--run",
        str(run),
        "--images",
        str(tmp_path),
        "--set",
        "class",
        "--out",
        str(tmp_path / "e"),
        "--device",
        "cpu",
        check=False,
    )
    assert p.returncode == 2 and "NAME=VALUE" in p.stderr, p.stderr


def test_an_unconditional_model_refuses_attributes(web_runs, tmp_path):
    p = run_here(
        "sample",
        "--run",
        str(web_runs / "tiny"),
        "--attr",
        "class=red",
        "--out",
        str(tmp_path / "x"),
        "--device",
        "cpu",
        check=False,
    )
    assert p.returncode == 2 and "unconditional" in p.stderr, p.stderr


def test_train_init_from_an_unconditional_run_starts_at_its_output(web_runs, tmp_path):
    data = _colour_folder(tmp_path / "data", per_class=8)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "data": {"val_fraction": 0.25}}))
    run = tmp_path / "run"
    p = run_here(
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--config",
        str(cfg),
        "--init",
        str(web_runs / "tiny"),
        "--labels",
        "folders",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--no-kid",
        "--quiet",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    )
    assert "starting from the weights" in p.stdout
    tensors, _ = ckpt.load(run / "checkpoints" / "last.safetensors")
    assert any(is_cond_parameter(k[len("model.") :]) for k in tensors if k.startswith("model."))
    p = run_here(
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "bad"),
        "--config",
        str(cfg),
        "--labels",
        "folders",
        "--attributes",
        "colour",
        "--max-steps",
        "1",
        "--no-kid",
        "--quiet",
        "--device",
        "cpu",
        check=False,
    )
    assert p.returncode == 2 and "no attribute 'colour'; they have: 'class'" in p.stderr


def test_a_labels_column_that_cannot_teach_anything_is_warned_of(tmp_path, capsys):
    """A column with one value, or a different value for every image (a name or a note taken
    for an attribute), was trained on without a word; each is now named in a warning."""
    from conftest import run_main
    from PIL import Image

    data = tmp_path / "shapes"
    data.mkdir()
    rows = ["file,colour,kind,caption"]
    for i in range(10):
        Image.new("RGB", (16, 16), (20 * i, 100, 200)).save(data / f"{i}.png")
        rows.append(f"{i}.png,{'red' if i % 2 else 'blue'},shape,picture number {i}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "data": {"val_fraction": 0.2}}))
    rc, _, err = run_main(capsys, "train", "--data", data, "--out", tmp_path / "run", "--config",
                          cfg, "--labels", data / "labels.csv", "--max-steps", 1, "--no-kid",
                          "--quiet", "--device", "cpu", "--batch-size", 4)  # fmt: skip
    assert rc == 0, err
    assert (
        "attribute kind has one value for all 10 labelled images: it tells the model nothing; "
        "leave it out with --attributes colour,caption"
    ) in err
    assert (
        "attribute caption has a different value for each of its 10 labelled images (a name or "
        "note column?): the model cannot learn what its values mean; leave it out with "
        "--attributes colour,kind"
    ) in err
    assert "attribute colour" not in err


def test_partially_labelled_data_trains_under_labels_missing_null(tmp_path, capsys):
    """An empty entry in the labels CSV is, under --labels-missing null, that attribute unknown
    for that image (before: refused even then). --attrs-from FILE.csv, edit --labels and the
    KID of the real images with asked values read it as unknown too. A column that no row
    fills gives nothing to condition on: named, with the --attributes that leaves it out."""

    from conftest import run_main

    from animeddim.data import DataError
    from animeddim.pipelines.conditional import _image_codes, codes_from_labels
    from animeddim.pipelines.control import _files_with

    data = tmp_path / "shapes"
    data.mkdir()
    rows = ["file,colour,shape,pet"]
    for i in range(10):
        Image.new("RGB", (16, 16), (20 * i, 100, 200)).save(data / f"{i}.png")
        shape = ("round", "square")[i // 2 % 2] if i % 2 == 0 else ""
        rows.append(f"{i}.png,{'red' if i % 3 else ''},{shape},")
    labels = data / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "data": {"val_fraction": 0.2}}))

    def train(out: str, *more: str) -> tuple[int, str]:
        rc, _, err = run_main(capsys, "train", "--data", data, "--out", tmp_path / out,
                              "--config", cfg, "--labels", labels, "--max-steps", 1, "--no-kid",
                              "--quiet", "--device", "cpu", "--batch-size", 4, *more)  # fmt: skip
        return rc, err

    rc, err = train("a")
    assert rc == 2
    assert (
        f"labels file '{labels}' row 2 (0.png): the value of 'colour', 'pet' is empty; "
        "fill it in, or pass --labels-missing null to use them as unlabelled"
    ) in err
    rc, err = train("b", "--labels-missing", "null")
    assert rc == 2
    assert (
        f"attribute pet has no value in any row of the labels ('{labels}'): there is nothing "
        "to condition on; fill it in, or leave it out with --attributes colour,shape"
    ) in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    rc, err = train("c", "--labels-missing", "null", "--attributes", "colour,shape")
    assert rc == 0, err
    vocab = json.loads((tmp_path / "c" / "config.json").read_text())["model"]["vocabulary"]
    assert vocab == {"colour": ["red"], "shape": ["round", "square"]}

    loaded = _loaded_with(vocab)
    want = [[NULL, 0], [0, NULL], [0, 1], [NULL, NULL], [0, 0]]
    assert codes_from_labels(loaded, labels)[:5].tolist() == want
    paths = [str(data / f"{i}.png") for i in range(5)]
    assert _image_codes(loaded, data, paths, str(labels)).tolist() == want
    assert [p.name for p in _files_with(data, labels, {"shape": "square"})] == ["2.png", "6.png"]
    with pytest.raises(DataError, match=r"shape values: 'round', 'square'\)$"):
        _files_with(data, labels, {"shape": "oval"})


def test_conditional_training_in_two_processes_equals_one(avatars16, tmp_path):
    from test_distributed import TOLERANCE, animeddim, max_differences, train_args

    labels = ("--labels", str(avatars16 / "labels.csv"), "--attributes", "hair_len,glasses")
    animeddim(*train_args(avatars16, tmp_path, "one", *labels, "--cond-drop", "0.5"))
    animeddim(*train_args(avatars16, tmp_path, "two", *labels, "--cond-drop", "0.5"), nproc=2)
    diff = max_differences(tmp_path / "one", tmp_path / "two")
    assert diff["model"] < TOLERANCE and diff["ema"] < TOLERANCE, diff
    tensors, meta = ckpt.load(tmp_path / "two" / "checkpoints" / "last.safetensors")
    assert list(meta["config"]["model"]["vocabulary"]) == ["hair_len", "glasses"]
    # The conditioning path has been trained (its projections left zero).
    assert tensors["model.mid.0.cond_proj.weight"].abs().max() > 0


def test_conditional_resume_is_bitwise_the_uninterrupted_run(avatars16, tmp_path):
    from test_distributed import train_args

    labels = ("--labels", str(avatars16 / "labels.csv"), "--attributes", "hair_len")
    run_here(*train_args(avatars16, tmp_path, "whole", *labels))
    run_here(*train_args(avatars16, tmp_path, "parts", *labels, "--max-steps", "4"))
    run_here("train", "--resume", str(tmp_path / "parts"), "--max-steps", "0", "--quiet")
    a, _ = ckpt.load(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    b, _ = ckpt.load(tmp_path / "parts" / "checkpoints" / "last.safetensors")
    for k in a:
        if k.startswith(("model.", "ema.")):
            assert torch.equal(a[k], b[k]), k


SHADES = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_training_batches_pair_each_image_with_its_own_label_row(tmp_path, cache):
    """What the network is told about an image is that image's labels.csv row: through the
    decode (and its disk cache), the split, the epoch shuffle, the flips and the process
    slices, under a stored vocabulary in an order of its own. Each image's colour and
    brightness are its labels, so its pixels say which row it must carry."""
    from animeddim import batches as batches_mod
    from animeddim.config import RunConfig
    from animeddim.train_data import load_data

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(60):
        colour, level = list(SHADES)[i % 3], ("dark", "light")[i // 3 % 2]
        im = np.full((16, 16, 3), SHADES[colour], np.float64) * (0.5 if level == "dark" else 1)
        im[:, :4] = 255  # an asymmetric band: a flipped image differs from the original
        name = f"{rng.integers(10**6):06d}-{i}.png"  # files sort in no label order
        Image.fromarray(im.astype(np.uint8)).save(root / name)
        rows.append(f"{name},{level},{colour}")
    rng.shuffle(rows)  # the CSV's rows in yet another order
    (root / "labels.csv").write_text("file,level,colour\n" + "\n".join(rows) + "\n")
    vocab = {"colour": ["green", "blue", "red"], "level": ["light", "dark"]}
    cfg = RunConfig.from_dict(
        {
            "data": {"path": str(root), "labels": str(root / "labels.csv"), "cache": cache},
            "model": {**TINY_MODEL, "vocabulary": vocab},
            "train": {"batch_size": 8, "kid": False, "precision": "fp32"},
        }
    ).validate()
    for load in range(2 if cache == "disk" else 1):  # the second load reads the cache
        d = load_data(cfg, root, progress=False)
        seen, flipped = 0, 0
        for rank in (0, 1):
            batches = batches_mod.iterate_batches(
                d.imageset.images,
                d.train_idx,
                8,
                seed=3,
                epoch=load + 1,
                shuffle=True,
                flip=True,
                drop_last=True,
                rank=rank,
                world_size=2,
                codes=d.codes,
            )
            for x, codes in batches:
                for img, (c_colour, c_level) in zip(x, codes.tolist(), strict=True):
                    centre = img[:, 8, 8] * 255
                    colour = list(SHADES)[int(centre.argmax())]  # red, green, blue
                    level = "light" if centre.max() > 160 else "dark"
                    assert (vocab["colour"][c_colour], vocab["level"][c_level]) == (colour, level)
                    flipped += bool(img[0, 8, -1] > 0.99)
                    seen += 1
        assert seen == len(d.train_idx) // 8 * 8 and 0 < flipped < seen

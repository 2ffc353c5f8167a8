"""ImageNet-style folders, Pillow transforms, seeded loaders and Mixup/CutMix (sat/data/image_folder.py,
image_transforms.py, image_loader.py, mixup.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sat.data.format import DataError
from sat.data.image_folder import ImageFolderDataset
from sat.data.image_loader import build_loader
from sat.data.image_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    random_resized_crop_box,
    to_normalized_tensor,
    train_transform,
)
from sat.data.mixup import Mixup, smooth_one_hot

CLASSES = ["cat", "dog", "fox"]
SIZES = [(40, 30), (50, 64), (33, 47), (64, 40)]


def _random_image(rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return img.convert(mode)


def make_folder(root: Path, split: str = "train", corrupt: bool = True) -> Path:
    """3 classes x 4 images (PNG and JPEG, several sizes, one grayscale), + one corrupt .JPEG in 'dog'."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        d = root / split / c
        d.mkdir(parents=True)
        for i, size in enumerate(SIZES):
            mode = "L" if (c, i) == ("fox", 3) else "RGB"
            img = _random_image(rng, size, mode)
            if i % 2 == 0:
                img.save(d / f"img{i}.png")
            else:
                img.save(d / f"img{i}.JPEG", quality=90)
    (root / split / "dog" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / split / "dog" / "zz_corrupt.JPEG").write_bytes(b"this is not a jpeg" * 10)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path)


# ---------------------------------------------------------------------------------------- discovery


def test_class_discovery_and_labels(folder: Path):
    ds = ImageFolderDataset(folder, "train", transform=None)
    assert ds.classes == CLASSES
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "fox": 2}
    assert len(ds) == 13  # 12 images + the corrupt one; notes.txt ignored
    assert ds.targets.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    for i in range(len(ds)):
        assert ds.path(i).parent.name == CLASSES[int(ds.targets[i])]
    img, label, sub = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 0 and sub == 0
    assert ds[12][0].mode == "RGB"  # the grayscale image is converted


def test_val_split_uses_train_classes(tmp_path: Path):
    make_folder(tmp_path, "train", corrupt=False)
    rng = np.random.default_rng(1)
    (tmp_path / "val" / "fox").mkdir(parents=True)  # val lacks 'cat' and 'dog' entirely
    _random_image(rng, (20, 20)).save(tmp_path / "val" / "fox" / "a.jpg")
    train = ImageFolderDataset(tmp_path, "train")
    val = ImageFolderDataset(tmp_path, "val", classes=train.classes)
    assert val.classes == CLASSES and len(val) == 1 and val[0][1] == 2
    (tmp_path / "val" / "wolf").mkdir()
    with pytest.raises(DataError, match="wolf"):
        ImageFolderDataset(tmp_path, "val", classes=train.classes)


def test_missing_or_empty_folders_raise_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "nowhere", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path, "val", classes=["cat"])
    # every message is one line
    try:
        ImageFolderDataset(tmp_path, "train")
    except DataError as e:
        assert "\n" not in str(e)


# --------------------------------------------------------------------------------------- transforms


def test_train_and_eval_shapes_and_dtypes(folder: Path):
    for tf in (train_transform(32, seed=0), eval_transform(32)):
        ds = ImageFolderDataset(folder, "train", transform=tf)
        for i in range(len(ds)):
            x, y, _ = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
            assert torch.isfinite(x).all()
            assert isinstance(y, int)


def test_normalisation_on_constant_colour():
    rgb = (200, 100, 30)
    img = Image.new("RGB", (45, 37), rgb)
    stats = zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in stats])
    for tf in (train_transform(32, seed=3), eval_transform(32)):
        x = tf(img)
        torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)
    # black and white map to -mean/std and (1-mean)/std
    x = to_normalized_tensor(Image.new("RGB", (2, 2), (255, 255, 255)))
    torch.testing.assert_close(x[:, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


def test_horizontal_flip_really_flips():
    # Full-image crop (scale 1, ratio 1 on a square image), so only the flip is random.
    rng = np.random.default_rng(0)
    img = _random_image(rng, (16, 16))
    plain = to_normalized_tensor(img)
    seen = {"flipped": 0, "plain": 0}
    tf = train_transform(16, seed=0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for _ in range(40):
        x = tf(img)
        if torch.equal(x, plain):
            seen["plain"] += 1
        else:
            torch.testing.assert_close(x, plain.flip(-1), atol=0, rtol=0)
            seen["flipped"] += 1
    assert seen["flipped"] > 5 and seen["plain"] > 5
    never = train_transform(16, seed=0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert all(torch.equal(never(img), plain) for _ in range(10))


def test_eval_centre_crop_geometry():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # H=32, W=48
    img = Image.fromarray(arr, "RGB")
    # crop_pct 1: shorter side already 32, no resize; crop columns 8..40
    x = eval_transform(32, crop_pct=1.0)(img)
    torch.testing.assert_close(x, to_normalized_tensor(Image.fromarray(arr[:, 8:40].copy())))
    # portrait image: rows cropped, offset (extra) // 2
    x = eval_transform(32, crop_pct=1.0)(Image.fromarray(arr.transpose(1, 0, 2).copy()))
    torch.testing.assert_close(x, to_normalized_tensor(Image.fromarray(arr.transpose(1, 0, 2)[8:40].copy())))
    # crop_pct 0.875 on 40x30: shorter side -> floor(32 / 0.875) = 36, i.e. 48x36; crop box (8, 2, 40, 34)
    img2 = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    ref = img2.resize((48, 36), Image.BICUBIC).crop((8, 2, 40, 34))
    torch.testing.assert_close(eval_transform(32)(img2), to_normalized_tensor(ref))
    assert eval_transform(224).resize_to == 256


def test_eval_crop_keeps_centre_content():
    # A red square in the middle of a white image stays in the middle after resize + centre crop.
    img = Image.new("RGB", (100, 80), (255, 255, 255))
    img.paste((255, 0, 0), (40, 30, 60, 50))
    x = eval_transform(32)(img)
    red = (x[1] < 0) & (x[2] < 0)  # green and blue channels far below the mean
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert abs(ys.float().mean().item() - 15.5) < 1.0 and abs(xs.float().mean().item() - 15.5) < 1.0


@settings(max_examples=200, deadline=None)
@given(
    w=st.integers(1, 300),
    h=st.integers(1, 300),
    seed=st.integers(0, 2**31),
    lo=st.floats(0.01, 1.0),
)
def test_random_resized_crop_box_inside_image(w: int, h: int, seed: int, lo: float):
    left, top, cw, ch = random_resized_crop_box(w, h, (lo, 1.0), (3 / 4, 4 / 3), random.Random(seed))
    assert 0 < cw <= w and 0 < ch <= h
    assert 0 <= left <= w - cw and 0 <= top <= h - ch


def test_random_resized_crop_fallback_is_centre_crop():
    # An impossible scale range (no crop fits) makes every attempt fail -> centred crop, aspect clamped.
    class Always(random.Random):
        def uniform(self, a, b):  # the biggest area and widest aspect every time
            return b

    assert random_resized_crop_box(100, 10, (1.0, 1.0), (3 / 4, 4 / 3), Always(0)) == (43, 0, 13, 10)
    assert random_resized_crop_box(10, 100, (1.0, 1.0), (3 / 4, 4 / 3), Always(0)) == (0, 43, 10, 13)
    assert random_resized_crop_box(50, 50, (1.0, 1.0), (3 / 4, 4 / 3), Always(0))[2:] in {(50, 50)}


# ------------------------------------------------------------------------------------ corrupt files


def test_corrupt_image_is_skipped_and_counted(folder: Path):
    ds = ImageFolderDataset(folder, "train", transform=eval_transform(32))
    bad = [i for i in range(len(ds)) if ds.path(i).name == "zz_corrupt.JPEG"]
    assert bad == [8]
    x, y, sub = ds[8]
    assert sub == 1 and ds.num_skipped == 1
    # deterministic replacement: the next readable index (9, the first 'fox' image)
    x9, y9, sub9 = ds[9]
    assert y == y9 == 2 and sub9 == 0 and torch.equal(x, x9)
    assert ds.num_skipped == 1
    ds[8]
    assert ds.num_skipped == 2  # counted every time it is met


def test_corrupt_last_image_wraps_and_truncated_jpeg(tmp_path: Path):
    make_folder(tmp_path, corrupt=False)
    good = tmp_path / "train" / "fox" / "img1.JPEG"
    data = good.read_bytes()
    (tmp_path / "train" / "fox" / "zz_truncated.JPEG").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tmp_path, "train", transform=eval_transform(32))
    last = len(ds) - 1
    assert ds.path(last).name == "zz_truncated.JPEG"
    x, y, sub = ds[last]
    assert sub == 1 and y == 0 and torch.equal(x, ds[0][0])


def test_all_unreadable_raises_data_error(tmp_path: Path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path, "train")
    with pytest.raises(DataError, match="no readable image"):
        ds[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_full_pass_through_loader_with_corrupt_file(folder: Path, num_workers: int):
    ds = ImageFolderDataset(folder, "train", transform=train_transform(32))
    loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=num_workers, seed=0, drop_last=False)
    for _epoch in range(2):
        n, skipped, labels = 0, 0, []
        for x, y, sub in loader:
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
            n += x.shape[0]
            skipped += int(sub.sum())
            labels += y.tolist()
        assert n == len(ds) and skipped == 1
        assert sorted(labels) == sorted([0] * 4 + [1] * 4 + [2] * 5)  # the corrupt dog became a fox


# ------------------------------------------------------------------------------------- determinism


def _epoch(ds, num_workers: int, seed: int) -> list[torch.Tensor]:
    loader = build_loader(ds, batch_size=5, shuffle=True, num_workers=num_workers, seed=seed, drop_last=True,
                          persistent_workers=False)
    return [torch.cat([x.flatten(), y.float()]) for x, y, _ in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_determinism(folder: Path, num_workers: int):
    def run(seed: int) -> list[torch.Tensor]:
        ds = ImageFolderDataset(folder, "train", transform=train_transform(32, seed=123))
        return _epoch(ds, num_workers, seed)

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 2  # 13 images, batch 5, drop_last
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))


def test_each_worker_and_epoch_gets_its_own_augmentation_stream(tmp_path: Path):
    # Four copies of one image, shuffle off, 2 workers: without per-worker seeding both forked workers
    # would replay the same random stream and items 0 and 1 would be identical.
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    img = _random_image(np.random.default_rng(0), (48, 40))
    for i in range(4):
        img.save(d / f"{i}.png")
    ds = ImageFolderDataset(tmp_path, "train", transform=train_transform(32, seed=0))
    loader = build_loader(ds, 1, False, num_workers=2, seed=0, drop_last=False, persistent_workers=False)
    first = [x for x, _, _ in loader]
    second = [x for x, _, _ in loader]
    assert not torch.equal(first[0], first[1])
    assert not all(torch.equal(u, v) for u, v in zip(first, second, strict=True))


def test_transforms_and_dataset_pickle(folder: Path):
    import pickle

    ds = ImageFolderDataset(folder, "train", transform=train_transform(32, seed=4))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], ds[0][0])
    assert pickle.loads(pickle.dumps(eval_transform(32))).resize_to == 36


def test_build_loader_arguments(folder: Path):
    ds = ImageFolderDataset(folder, "train", transform=eval_transform(32))
    sampler = torch.utils.data.SequentialSampler(ds)
    loader = build_loader(ds, 4, shuffle=False, num_workers=0, seed=0, drop_last=False, sampler=sampler)
    assert [y.tolist() for _, y, _ in loader][0] == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        build_loader(ds, 4, shuffle=True, num_workers=0, seed=0, drop_last=False, sampler=sampler)


# ------------------------------------------------------------------------------------------- mixup


def _batch(b: int = 8, c: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 16, 16, generator=g)
    y = torch.arange(b) % c
    return x, y


def test_mixup_targets_rows_sum_to_one():
    x, y = _batch()
    for kwargs in ({}, {"cutmix_alpha": 0.0}, {"mixup_alpha": 0.0}, {"prob": 0.5}):
        m = Mixup(num_classes=10, seed=0, **kwargs)
        for _ in range(20):
            xm, t = m(x, y)
            assert xm.shape == x.shape and t.shape == (8, 10) and t.dtype == torch.float32
            torch.testing.assert_close(t.sum(1), torch.ones(8))
            assert (t >= 0).all()


def test_mixup_alphas_zero_is_label_smoothing_only():
    x, y = _batch()
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
    xm, t = m(x, y)
    assert torch.equal(xm, x)
    expected = torch.full((8, 10), 0.01)
    expected[torch.arange(8), y] = 0.91
    torch.testing.assert_close(t, expected)
    torch.testing.assert_close(smooth_one_hot(y, 10, 0.1), expected)
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    expected_loss = F.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(F.cross_entropy(logits, t), expected_loss)  # soft targets, as training reads them


def test_mixup_mode_mixes_inputs_and_targets_consistently():
    x, y = _batch()
    m = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10, seed=5)
    xm, t = m(x, y)
    lam = t[0, y[0]].item()
    assert 0 < lam < 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[0, y.flip(0)[0]], torch.tensor(1 - lam))


def test_cutmix_pastes_a_box_and_lam_is_its_area():
    b = 4
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 20, 20).contiguous()
    y = torch.arange(b)
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=b, seed=2)
    for _ in range(10):
        xm, t = m(x, y)
        from_other = (xm[0, 0] == x.flip(0)[0, 0]).float().mean().item()
        assert set(xm[0, 0].unique().tolist()) <= {0.0, 3.0}
        torch.testing.assert_close(t[0, 0], torch.tensor(1 - from_other))
        torch.testing.assert_close(t[0, 3], torch.tensor(from_other))


def test_mixup_determinism_and_state():
    x, y = _batch()
    a, b = Mixup(num_classes=10, seed=7), Mixup(num_classes=10, seed=7)
    for _ in range(5):
        (xa, ta), (xb, tb) = a(x, y), b(x, y)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    state = a.state_dict()
    first = a(x, y)
    b.load_state_dict(state)
    second = b(x, y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

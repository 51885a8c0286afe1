"""The optional localisation loss: it rewards a map that peaks in the lesion, its outlines sit where
the lesion is in the model's input (after resizing and augmentation), and training lowers it."""

from __future__ import annotations

import numpy as np
import torch

from DADRNLesionLib.growing import TrainingPool
from DADRNLesionLib.localisation_loss import localisation_loss, outlines_in_input
from DADRNLesionLib.preprocess import CropBox, InputSpec, prepare_batch
from DADRNLesionLib.train import AugmentConfig, TrainConfig, augment_batch, augment_with_outlines, train
from test_train import SIZE, TINY, quiet, toy_cache, toy_split

CELLS = 8


def _square(n: int, r0: int, c0: int, side: int) -> torch.Tensor:
    m = torch.zeros(n, 1, 32, 32)
    m[:, :, r0 : r0 + side, c0 : c0 + side] = 1
    return m


def _features_peaking_at(cell: tuple[int, int], channels: int = 4) -> torch.Tensor:
    f = torch.rand(1, channels, CELLS, CELLS, generator=torch.Generator().manual_seed(0)) * 0.1
    f[0, :, cell[0], cell[1]] += 2.0
    return f


def test_a_map_peaking_in_the_outline_costs_less_than_one_peaking_beside_it():
    weights = torch.eye(5, 4)  # class c looks at channel c (class 4: none)
    target = torch.tensor([1])
    outline, inside, has = _square(1, 8, 8, 8), torch.ones(1, 1, 32, 32), torch.tensor([True])  # cells (2..3, 2..3)
    hit = localisation_loss(_features_peaking_at((2, 3)), weights, target, outline, inside, has)
    miss = localisation_loss(_features_peaking_at((6, 6)), weights, target, outline, inside, has)
    assert float(hit) < 0.5 < 2.0 < float(miss)
    # standardised over the liver: scaling the features changes nothing
    scaled = localisation_loss(_features_peaking_at((6, 6)) * 10, weights, target, outline, inside, has)
    assert torch.isclose(scaled, miss, rtol=1e-4)


def test_descending_the_loss_moves_the_maps_peak_into_the_lesion():
    weights = torch.eye(5, 4)
    f = _features_peaking_at((6, 6)).requires_grad_(True)
    outline, inside, has = _square(1, 8, 8, 8), torch.ones(1, 1, 32, 32), torch.tensor([True])
    opt = torch.optim.SGD([f], lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        localisation_loss(f, weights, torch.tensor([1]), outline, inside, has).backward()
        opt.step()
    peak = divmod(int(f[0, 1].argmax()), CELLS)
    assert 2 <= peak[0] <= 3 and 2 <= peak[1] <= 3, peak


def test_slices_without_a_usable_outline_add_nothing():
    weights = torch.eye(5, 4)
    f = torch.rand(3, 4, CELLS, CELLS, requires_grad=True)
    inside = torch.zeros(3, 1, 32, 32)
    inside[:, :, :16] = 1  # the liver fills the top half
    outline = torch.zeros(3, 1, 32, 32)
    outline[1, :, 20:28, 20:28] = 1  # outside the liver: no usable cell
    outline[2, :, :16] = 1  # the whole liver: nothing to tell apart
    outline[0, :, 4:8, 4:8] = 1  # usable, but marked as having no outline
    loss = localisation_loss(f, weights, torch.tensor([1, 2, 3]), outline, inside, torch.tensor([False, True, True]))
    assert float(loss.detach()) == 0.0
    loss.backward()  # a graph all the same, so that the training step needs no special case
    assert float(f.grad.abs().sum()) == 0.0
    with_one = localisation_loss(f, weights, torch.tensor([1, 2, 3]), outline, inside, torch.tensor([True, True, True]))
    only_one = localisation_loss(f[:1], weights, torch.tensor([1]), outline[:1], inside[:1], torch.tensor([True]))
    assert torch.isclose(with_one, only_one)


def test_outlines_are_resized_as_the_image_is():
    """A bright disk in a non-square crop box: after `prepare_batch`'s resize, its pixels are the outline's."""
    jj, ii = np.mgrid[0:60, 0:40]
    disk = (jj - 25) ** 2 + (ii - 22) ** 2 < 8**2
    liver = np.ones((3, 60, 40), np.uint8)
    ct = np.where(disk, 300, 60)[None].repeat(3, 0).astype(np.int16)
    spec = InputSpec(size=SIZE)
    x = prepare_batch(ct, liver, [1], CropBox(0, 60, 0, 40), spec)
    bright = x[0, 1] > (((60 + 300) / 2 - spec.window[0]) / (spec.window[1] - spec.window[0]))
    masks = np.stack([liver[1], disk, disk]).astype(np.uint8)
    outline, has = outlines_in_input([masks, None], SIZE)
    assert has.tolist() == [True, False] and float(outline[1].sum()) == 0
    got = outline[0, 0] > 0
    iou = float((got & bright).sum()) / float((got | bright).sum())
    assert iou > 0.7, iou


def test_augmentation_moves_the_outline_with_the_image_and_draws_as_before():
    cache = toy_cache()
    lesion = np.flatnonzero(cache.labels == 2)[:6]  # FNH: bright blobs
    x = torch.from_numpy(cache.images[lesion]).float() / 255
    outline, has = outlines_in_input(cache.outline_masks(lesion), SIZE)
    assert bool(has.all())
    cfg = AugmentConfig(p_affine=1.0, rotate_deg=20.0, scale=0.15, translate=0.1, noise_hu=0.0)
    moved_x, moved = augment_with_outlines(x, outline, cfg, 400.0, torch.Generator().manual_seed(5))
    assert torch.equal(moved_x, augment_batch(x, cfg, 400.0, torch.Generator().manual_seed(5)))
    assert not torch.equal(moved, outline)  # it did move
    bright = moved_x[:, 1:2] > 0.75
    iou = float((bright & (moved > 0)).sum()) / float((bright | (moved > 0)).sum())
    assert iou > 0.6, iou


def test_the_training_pool_gives_each_slice_its_own_outline():
    a, b = toy_cache(seed=0), toy_cache(seed=1)
    start = np.flatnonzero(a.labels >= 0)[::3]
    pool = TrainingPool(a, start)
    pool.add(b)
    idx = np.array([len(pool) - 1, 0, 5, len(start) + 2, 3])
    got = pool.outline_masks(idx)
    want = [(a.masks.get(int(start[i])) if i < len(start) else b.masks.get(int(i - len(start)))) for i in idx]
    assert len(got) == len(want) and any(w is not None for w in want) and any(w is None for w in want)
    for g, w in zip(got, want):
        assert (g is None and w is None) or np.array_equal(g, w)


def test_training_with_the_loss_lowers_it_and_logs_it(tmp_path):
    cache = toy_cache()
    split = toy_split(cache)
    n_train = len(cache.indices_of_cases([c for c, s in split.items() if s == "train"]))
    cfg = TrainConfig(epochs=10, batch_size=n_train, samples_per_epoch=n_train, balance="none", augment=None, lr=3e-3,
                      warmup_fraction=0.0, label_smoothing=0.0, patience=0, localisation_loss=1.0)
    result = train(cache, split, TINY, cfg, tmp_path / "run", device="cpu", threads=1, evaluate_test=False, log=quiet, progress_bar=False)
    place = [h["train_localisation_loss"] for h in result.history]
    assert place[0] > 0 and place[-1] < 0.8 * place[0], place
    assert "train_localisation_loss" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]

"""The downstream-utility benchmark's pieces: Dice, the fixed segmenter recipe, W1 table."""

from __future__ import annotations


import numpy as np



def test_dice_and_w1_table(load_pipeline) -> None:
    b = load_pipeline("benchmark_utility")
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert b.dice(a, a) == 1.0 and b.dice(a, ~a) == 0.0 and b.dice(a * 0, a * 0) == 1.0
    real = {"tumor": np.array([0.1, 0.2, 0.3])}
    table = b.w1_table({"tumor": real["tumor"] + 0.5}, {"tumor": real["tumor"]}, real, {})
    assert np.isclose(table["tumor"]["inpainted"], 0.5) and table["tumor"]["healthy_before"] == 0.0


def test_segmenter_recipe_is_seeded_and_learns(load_pipeline) -> None:
    b = load_pipeline("benchmark_utility")
    rng = np.random.default_rng(0)
    labels = np.zeros((8, 1, 16, 16), np.float32)
    labels[:, :, 4:9, 5:10] = 1
    images = (0.2 + 0.6 * labels + 0.05 * rng.standard_normal(labels.shape)).astype(np.float32)
    data = b.SliceSet(images, labels)
    nets = [b.train_segmenter(data, seed=1, iterations=30, batch=4) for _ in range(2)]
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy())
    volume = b.EvalVolume("v", "tumor", np.moveaxis(images[:, 0], 0, -1), np.moveaxis(labels[:, 0] > 0, 0, -1),
                          np.ones(8, bool))
    assert b.evaluate_segmenter(nets[0], [volume])["mean"] > 0.5


def test_slice_sets_add_and_moved_pairs(load_pipeline) -> None:
    b = load_pipeline("benchmark_utility")
    labels = np.zeros((6, 1, 16, 16), np.float32)
    labels[:4, :, 4:9, 5:10] = 1
    images = (0.2 + 0.6 * labels).astype(np.float32)
    both = b.SliceSet(images[:3], labels[:3]) + b.SliceSet(images[3:], labels[3:])
    assert len(both) == 6 and np.array_equal(both.images, images) and np.array_equal(both.labels, labels)
    # a pairs manifest written in another checkout: the source scan is found by file name
    healthy = {"sub-003.nii.gz": ("/here/train/images/sub-003.nii.gz", "/here/train/masks/sub-003.nii.gz")}
    row = {"source_scan": "/elsewhere/sample_data/train/images/sub-003.nii.gz"}
    assert b.source_of(row, healthy) == healthy["sub-003.nii.gz"]
    assert b.source_of({"source_scan": "/x/other.nii.gz"}, healthy) == ("/x/other.nii.gz", None)


def test_pairs_are_needed_only_for_synthetic_data_or_realism(capsys, load_pipeline) -> None:
    import pytest

    b = load_pipeline("benchmark_utility")
    args = b.parse_args(["--checkpoint", "m", "--training-data", "real", "--parts", "utility",
                         "--eval-split", "validation_lesions"])
    assert not b.needs_pairs(args) and args.pairs is None and args.eval_split == "validation_lesions"
    for argv in (["--checkpoint", "m"], ["--checkpoint", "m", "--training-data", "real"],
                 ["--checkpoint", "m", "--parts", "utility", "--training-data", "real", "synthetic"]):
        with pytest.raises(SystemExit) as exc:
            b.parse_args(argv)
        assert exc.value.code == 2 and "--pairs is needed" in capsys.readouterr().err
    assert b.needs_pairs(b.parse_args(["--checkpoint", "m", "--pairs", "p"]))

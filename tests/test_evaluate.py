"""ADM-evaluator semantics of `regdit eval`, on random Inception weights saved to a file and loaded
by path."""
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg, special

from regdit import RegditError
from regdit.commands import cli
from regdit.commands.evaluate import (
    INCEPTION_WEIGHTS_FILE,
    METRIC_NAMES,
    ImageFolder,
    ManifoldEstimator,
    compute_activations,
    fid_statistics,
    frechet_distance,
    inception_score,
    load_inception,
    load_npz_images,
    save_random_inception_weights,
)


@pytest.fixture(scope="session")
def weights(inception_weights):
    return inception_weights


def _images(count, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# ---- images and weights: one-line errors ---------------------------------------------------------


def test_npz_images_are_read_in_slices_from_plain_and_compressed_archives(tmp_path):
    images = _images(5)
    np.savez(tmp_path / "plain.npz", arr_0=images, labels=np.arange(5))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    for name in ("plain.npz", "packed.npz"):
        with load_npz_images(tmp_path / name, num_images=4) as loaded:
            assert loaded.shape == (4, 16, 16, 3) and len(loaded) == 4
            np.testing.assert_array_equal(loaded[1:3], images[1:3])
            np.testing.assert_array_equal(loaded[3:10], images[3:4])  # clipped to num_images
            np.testing.assert_array_equal(np.asarray(loaded), images[:4])


@pytest.mark.parametrize("arrays, message", [
    ({"images": _images(2)}, "has no arr_0 (keys: images)"),
    ({"arr_0": _images(2).astype(np.float32)}, "dtype float32, expected uint8"),
    ({"arr_0": _images(2).transpose(0, 3, 1, 2)}, "transpose NCHW to NHWC"),
    ({"arr_0": _images(2)[..., 0]}, "expected N x H x W x 3"),
    ({"arr_0": _images(2)}, "holds 2 images, fewer than the 3 asked for"),
])
def test_bad_npz_gives_one_line_error_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(RegditError) as error:
        load_npz_images(path, num_images=3)
    assert message in str(error.value) and str(path) in str(error.value) \
        and "\n" not in str(error.value)


def test_zip_without_arr_0_lists_a_few_keys_and_what_is_expected(tmp_path):
    # a zip of 100+ members
    torch.save({str(index): torch.zeros(1) for index in range(100)}, tmp_path / "some.pt")
    with pytest.raises(RegditError) as error:
        load_npz_images(tmp_path / "some.pt")
    message = str(error.value)
    assert "some.pt has no arr_0 (keys: " in message and "in all)" in message \
        and "archive/data/99" not in message
    assert "ADM-style .npz with arr_0 = uint8 N x H x W x 3" in message and "\n" not in message


def test_missing_or_foreign_npz_file(tmp_path):
    with pytest.raises(RegditError, match="no such file"):
        load_npz_images(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(RegditError, match="not a readable .npz"):
        load_npz_images(tmp_path / "text.npz")


def test_image_folder_rejects_grayscale_and_mixed_sizes(tmp_path):
    Image.fromarray(_images(1)[0]).save(tmp_path / "a.png")
    Image.fromarray(_images(1, size=8)[0]).save(tmp_path / "b.png")
    Image.fromarray(_images(1)[0, ..., 0]).save(tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("not an image")  # only IMAGE_SUFFIXES files are listed
    with ImageFolder(tmp_path) as folder:
        assert folder.shape == (4, 16, 16, 3)
        with pytest.raises(RegditError, match="b.png is 8x8, expected 16x16 like the first image"):
            folder[0:2]
        with pytest.raises(RegditError, match="c.png is L, not 8-bit RGB"):
            folder[2:3]
        with pytest.raises(RegditError, match="d.png is not a readable image"):
            folder[3:4]


def test_image_folder_reads_nested_images_in_relative_path_order(tmp_path):
    images = _images(3)
    (tmp_path / "b").mkdir()
    for image, name in zip(images, ("a.png", "b/c.PNG", "b.jpg")):
        Image.fromarray(image).save(tmp_path / name, format="PNG")  # lossless whatever the suffix
    with ImageFolder(tmp_path, num_images=3) as folder:
        assert [path.removeprefix(str(tmp_path)) for path in folder.paths] \
            == ["/a.png", "/b.jpg", "/b/c.PNG"]
        np.testing.assert_array_equal(folder[0:3], images[[0, 2, 1]])
    with pytest.raises(RegditError, match="holds 3 images, fewer than the 4 asked for"):
        ImageFolder(tmp_path, num_images=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegditError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_missing_inception_weights_say_where_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    # torch-fidelity's download cache lives here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("REGDIT_INCEPTION_WEIGHTS", raising=False)
    # no download (test_downloads downloads)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RegditError) as error:
        load_inception(device="cpu")
    assert str(error.value) == (
        "not downloading the Inception weights: HF_HUB_OFFLINE=1 is set; "
        f"download {URL_INCEPTION_V3} on a machine with network and put it at "
        f"{tmp_path / 'torch' / 'hub' / 'checkpoints' / INCEPTION_WEIGHTS_FILE} "
        "(or pass --inception-weights PATH)")
    monkeypatch.setenv("REGDIT_INCEPTION_WEIGHTS", str(tmp_path / "elsewhere.pth"))
    with pytest.raises(RegditError, match="elsewhere.pth"):
        load_inception(device="cpu")


def test_weights_that_are_not_an_inception_state_dict_are_refused(tmp_path):
    # needs unpickling code
    torch.save({"config": datetime.date(2015, 12, 5)}, tmp_path / "pickled.pth")
    with pytest.raises(RegditError, match="not a loadable Inception state dict"):
        load_inception(tmp_path / "pickled.pth", device="cpu")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(RegditError, match="a list, not a mapping of names to tensors"):
        load_inception(tmp_path / "list.pth", device="cpu")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(RegditError, match="does not hold torch-fidelity's Inception-v3 weights"):
        load_inception(tmp_path / "other.pth", device="cpu")


def test_weights_file_is_read_once_and_only_with_weights_only(weights, monkeypatch):
    loads, torch_load = [], torch.load

    def recording_load(source, *args, **kwargs):
        loads.append((source, kwargs.get("weights_only")))
        return torch_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)  # torch-fidelity calls torch.load too
    model = load_inception(weights, device="cpu")
    file_loads = [(source, weights_only) for source, weights_only in loads
                  if isinstance(source, (str, os.PathLike))]
    assert file_loads == [(weights, True)]
    expected = torch_load(weights, weights_only=True)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in expected.items())


# ---- Inception features --------------------------------------------------------------------------


def test_activations_are_pool3_unbiased_logits_and_mixed_6d_branch1x1_in_hwc_order(weights):
    model = load_inception(weights, device="cpu")
    images = _images(2)
    tf32_flags, taps = [], []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: tf32_flags.append((torch.backends.cuda.matmul.allow_tf32,
                                                          torch.backends.cudnn.allow_tf32)))
    features = compute_activations(images, model, batch_size=1)
    hook.remove()
    assert tf32_flags == [(False, False)] * 2
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: taps.append(output))
    with torch.no_grad():
        pool = torch.cat([model(torch.from_numpy(image[None]).permute(0, 3, 1, 2))[0]
                          for image in images])
    hook.remove()
    mixed_6 = torch.cat(taps)
    assert features["pool"].shape == (2, 2048) and features["logits"].shape == (2, 1008)
    assert features["spatial"].shape == (2, 17 * 17 * 7)
    np.testing.assert_allclose(features["spatial"],
                               mixed_6.permute(0, 2, 3, 1)[..., :7].reshape(2, -1))  # NHWC
    assert not np.allclose(features["spatial"], mixed_6[:, :7].reshape(2, -1))  # not C, H, W order
    np.testing.assert_allclose(features["pool"], pool)
    np.testing.assert_allclose(features["logits"], pool @ model.fc.weight.T, rtol=1e-4, atol=1e-5)
    assert not np.allclose(features["logits"], pool @ model.fc.weight.T + model.fc.bias,
                           atol=1e-3)  # no bias


# ---- metrics -------------------------------------------------------------------------------------


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    # commuting covariances with a shared eigenbasis
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) \
        == pytest.approx(closed_form, rel=1e-10)
    assert frechet_distance(mu1, rotation @ np.diag(a) @ rotation.T, mu2,
                            rotation @ np.diag(b) @ rotation.T) \
        == pytest.approx(closed_form, rel=1e-8)
    # 1-D: (m1-m2)^2 + (s1-s2)^2
    assert frechet_distance(0.0, 4.0, 1.0, 9.0) == pytest.approx(1 + (2 - 3) ** 2)


def test_frechet_distance_is_real_for_nearly_singular_covariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.3
    (mu1, sigma1), (mu2, sigma2) = fid_statistics(x), fid_statistics(y)  # rank 19 in 64 dimensions
    # the case that needs ADM's imaginary-part handling
    assert np.iscomplexobj(linalg.sqrtm(sigma1 @ sigma2))
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    # tr sqrt(s1 s2) = sum of sqrt(eigenvalues of s1^1/2 s2 s1^1/2)
    root1 = linalg.sqrtm(sigma1).real
    eigenvalues = np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.sqrt(eigenvalues).sum())
    assert isinstance(fid, float) and np.isfinite(fid)
    # sqrtm of a singular product is only this accurate (as ADM's)
    assert fid == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_retries_with_eps_and_rejects_imaginary_roots():
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # sqrtm of this product is not finite
    eps = 1e-6  # (s1 + eps I)(I + eps I) is triangular with diagonal eps (1 + eps)
    with pytest.warns(UserWarning, match="singular product; adding 1e-06 to diagonal"):
        fid = frechet_distance(np.zeros(2), nilpotent, np.zeros(2), np.eye(2))
    assert fid == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)
    with pytest.raises(RegditError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def _adm_inception_score(preds, split_size=5000):
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def test_inception_score_uses_contiguous_5000_sample_splits():
    rng = np.random.default_rng(0)
    # confidence grows along the batch
    logits = rng.normal(size=(12000, 10)) * np.linspace(0.1, 5, 12000)[:, None]
    probs = special.softmax(logits, axis=1)
    score = inception_score(probs)
    assert score == pytest.approx(_adm_inception_score(probs), rel=1e-12)
    manual = np.mean([_adm_inception_score(probs[s:s + 5000], 5000) for s in (0, 5000, 10000)])
    assert score == pytest.approx(manual, rel=1e-12)
    # no shuffle
    assert score != pytest.approx(inception_score(probs[rng.permutation(12000)]), rel=1e-3)
    assert score != pytest.approx(inception_score(probs, split_size=12000), rel=1e-3)


def test_inception_score_closed_form():
    classes = 4
    probs = np.full((8, classes), 0.1 / classes) + 0.9 * np.eye(classes)[np.arange(8) % classes]
    confident, other = 0.9 + 0.1 / classes, 0.1 / classes  # the marginal is uniform
    expected = np.exp(confident * np.log(confident * classes)
                      + (classes - 1) * other * np.log(other * classes))
    assert inception_score(probs) == pytest.approx(expected, rel=1e-12)
    assert inception_score(np.full((6, 5), 0.2)) == pytest.approx(1.0)


def _adm_pairwise_distances(u, v):
    """ADM's DistanceBlock as ManifoldEstimator reads it: float16 squares, norms and dot products
    accumulated in float32 and rounded once to float16, else float32 when any distance is not
    finite."""
    def batch_pairwise_distances(u, v):
        norm_u = np.sum(np.square(u).astype(np.float32), 1).astype(u.dtype).reshape(-1, 1)
        norm_v = np.sum(np.square(v).astype(np.float32), 1).astype(u.dtype).reshape(1, -1)
        uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(u.dtype)
        return np.maximum(norm_u - 2 * uv + norm_v, 0.0)

    with np.errstate(over="ignore", invalid="ignore"):  # TF overflows to inf silently
        distances = batch_pairwise_distances(u.astype(np.float16), v.astype(np.float16))
    if np.all(np.isfinite(distances)):
        return distances.astype(np.float32)
    return batch_pairwise_distances(u, v)


def _adm_manifold_radii(features, row_batch_size, col_batch_size, nhood_sizes=(3,)):
    num_images = len(features)
    radii = np.zeros([num_images, len(nhood_sizes)], dtype=np.float32)
    distance_batch = np.zeros([row_batch_size, num_images], dtype=np.float32)
    seq = np.arange(max(nhood_sizes) + 1, dtype=np.int32)
    for begin1 in range(0, num_images, row_batch_size):
        end1 = min(begin1 + row_batch_size, num_images)
        row_batch = features[begin1:end1]
        for begin2 in range(0, num_images, col_batch_size):
            end2 = min(begin2 + col_batch_size, num_images)
            distance_batch[0:end1 - begin1, begin2:end2] = _adm_pairwise_distances(
                row_batch, features[begin2:end2])
        partitioned = np.partition(distance_batch[0:end1 - begin1, :], seq, axis=1)
        radii[begin1:end1, :] = partitioned[:, list(nhood_sizes)]
    return radii


def _adm_evaluate_pr(features_1, radii_1, features_2, radii_2, row_batch_size, col_batch_size):
    features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
    features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
    for begin_1 in range(0, len(features_1), row_batch_size):
        end_1 = begin_1 + row_batch_size
        batch_1 = features_1[begin_1:end_1]
        for begin_2 in range(0, len(features_2), col_batch_size):
            end_2 = begin_2 + col_batch_size
            batch_2 = features_2[begin_2:end_2]
            dist32 = _adm_pairwise_distances(batch_1, batch_2)[..., None]
            batch_1_in = np.any(dist32 <= radii_2[begin_2:end_2], axis=1)
            batch_2_in = np.any(dist32 <= radii_1[begin_1:end_1][:, None], axis=0)
            features_1_status[begin_1:end_1] |= batch_1_in
            features_2_status[begin_2:end_2] |= batch_2_in
    return (np.mean(features_2_status.astype(np.float64), axis=0),
            np.mean(features_1_status.astype(np.float64), axis=0))


def test_precision_recall_equal_adm_manifold_estimator_transcription():
    rng = np.random.default_rng(0)
    # Multiples of 1/4 keep every float32 sum exact (no dependence on summation order) while the
    # float16 roundings of squares, norms and dot products still happen; rows of large integers
    # overflow float16 and send their blocks through the float32 recomputation.
    ref = rng.integers(0, 80, (150, 32)) / 4
    samples = rng.integers(0, 90, (130, 32)) / 4 + 1
    ref[140:] = rng.integers(0, 100, (10, 32))
    ref[20:25] = ref[2]  # copies of a row whose float16 self-distance is -8 before ADM's clamp at 0
    samples[:3] = rng.integers(0, 100, (3, 32))
    ref, samples = ref.astype(np.float32), samples.astype(np.float32)
    estimator = ManifoldEstimator(row_batch_size=64, col_batch_size=48, device="cpu")
    radii_ref, radii_samples = estimator.manifold_radii(ref), estimator.manifold_radii(samples)
    np.testing.assert_array_equal(radii_ref, _adm_manifold_radii(ref, 64, 48))
    np.testing.assert_array_equal(radii_samples, _adm_manifold_radii(samples, 64, 48))
    large = radii_ref[140:]  # their blocks overflow float16 and are recomputed in float32
    assert not np.array_equal(large.astype(np.float16).astype(np.float32), large)
    small = ref[:140]  # no overflow: every distance is a float16 value, rounded from the exact one
    radii_small = estimator.manifold_radii(small)[:, 0]
    squared_distances = ((small[:, None].astype(np.float64) - small[None]) ** 2).sum(-1)
    exact = np.partition(squared_distances, 3, axis=1)[:, 3]
    assert np.array_equal(radii_small.astype(np.float16), radii_small) \
        and not np.array_equal(radii_small, exact)
    precision, recall = estimator.evaluate_pr(ref, radii_ref, samples, radii_samples)
    adm_precision, adm_recall = _adm_evaluate_pr(ref, radii_ref, samples, radii_samples, 64, 48)
    np.testing.assert_array_equal(precision, adm_precision)
    np.testing.assert_array_equal(recall, adm_recall)
    assert 0 < precision[0] < 1 and 0 < recall[0] < 1 and precision[0] != recall[0]
    assert estimator.precision_recall(ref, samples) == (adm_precision[0], adm_recall[0])


def test_precision_recall_direction_and_third_neighbour_radii():
    ref = np.arange(5, dtype=np.float32)[:, None]  # 0, 1, 2, 3, 4
    samples = np.array([0.5, 1.5, 7, 30, 40], np.float32)[:, None]
    estimator = ManifoldEstimator(device="cpu")
    # squared distance to the 3rd neighbour, the point itself being neighbour 0
    np.testing.assert_array_equal(estimator.manifold_radii(ref)[:, 0], [9, 4, 4, 4, 9])
    # precision: 3 of 5 samples lie inside the reference manifold, 7 exactly on the radius of 4
    # (<=); recall: the first sample's radius (29.5^2) covers every reference point
    assert estimator.precision_recall(ref, samples) == (0.6, 1.0)
    # order-free; any numpy strides
    assert estimator.precision_recall(ref[::-1], samples[::-1]) == (0.6, 1.0)


# ---- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_ref_then_eval_reads_reference_statistics_and_writes_table_and_json(tmp_path, weights,
                                                                                 capsys):
    images = _images(6, seed=3)
    (tmp_path / "folder").mkdir()
    for index, image in enumerate(images[:5]):
        Image.fromarray(image).save(tmp_path / "folder" / f"{index:06d}.png")
    cli.main(["eval", "--make-ref", str(tmp_path / "folder"), "--output", str(tmp_path / "ref.npz"),
              "--ref-images", "4", "--inception-weights", weights, "--device", "cpu"])
    assert "statistics of 5 images, arr_0 of 4" in capsys.readouterr().out
    with np.load(tmp_path / "ref.npz") as ref:
        reference = dict(ref)
    # evenly spaced over the folder
    np.testing.assert_array_equal(reference["arr_0"], images[[0, 1, 3, 4]])
    assert reference["mu"].shape == (2048,) and reference["sigma_s"].shape == (2023, 2023)

    # The samples are the 5 folder images, so with the reference means shifted and its covariances
    # zeroed (zero covariances also keep sqrtm cheap) the statistics read from the npz give FID =
    # |shift|^2 + tr(sigma).
    rng = np.random.default_rng(5)
    shift, shift_s = rng.uniform(0, 0.1, 2048), rng.uniform(0, 0.1, 2023)
    np.savez(tmp_path / "shifted.npz", arr_0=reference["arr_0"], mu=reference["mu"] + shift,
             sigma=np.zeros((2048, 2048)), mu_s=reference["mu_s"] + shift_s,
             sigma_s=np.zeros((2023, 2023)))
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=np.arange(6))
    cli.main(["eval", "--ref-batch", str(tmp_path / "shifted.npz"),
              "--sample_batch", str(tmp_path / "samples.npz"), "--num-samples", "5",
              "--inception-weights", weights, "--device", "cpu"])
    out, err = capsys.readouterr()
    # FID from 4 and 5 images: one line
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "shifted.npz (4) and " in warnings[0] \
        and "samples.npz (5)" in warnings[0]
    assert "not comparable to 50k-sample numbers" in warnings[0]
    results = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert results["fid"] == pytest.approx(np.sum(shift ** 2) + np.trace(reference["sigma"]),
                                           rel=1e-6)
    assert results["sfid"] == pytest.approx(np.sum(shift_s ** 2) + np.trace(reference["sigma_s"]),
                                            rel=1e-6)
    assert 1 <= results["inception_score"] <= 1008
    assert results["recall"] == 1.0  # every reference image is a sample
    assert results["precision"] in (0.8, 1.0)  # 4 samples are reference images; the third is not
    assert results["settings"]["num_samples"] == 5 and results["settings"]["num_ref"] == 4
    assert results["settings"]["ref_statistics_from"] == "npz" \
        and results["settings"]["inception_weights"] == weights
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert name in out
    assert f"{results['fid']:.4f}" in out


@pytest.mark.parametrize("argv, message", [
    (["--ref_batch", "REF"], "needs --ref_batch REF.npz and --sample_batch SAMPLES.npz"),
    (["--make-ref", "DIR"], "needs --output REF.npz"),
    (["--ref_batch", "REF", "--sample_batch", "SAMPLES", "--num-samples", "7"],
     "holds 6 images, fewer than the 7"),
    (["--ref_batch", "REF", "--sample_batch", "SAMPLES", "--inception-weights", "absent.pth"],
     "Inception weights not found at absent.pth"),
])
def test_eval_command_errors_are_one_line(tmp_path, argv, message):
    np.savez(tmp_path / "images.npz", arr_0=_images(6))
    paths = {"REF": str(tmp_path / "images.npz"), "SAMPLES": str(tmp_path / "images.npz"),
             "DIR": str(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *[paths.get(arg, arg) for arg in argv], "--device", "cpu"])
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path):
    """`regdit eval` on 2 processes (torchrun, gloo): each computes the features of every other
    batch, the same batches as one process, so the metrics are equal to the last bit."""
    weights = str(save_random_inception_weights(tmp_path / "inception.pth"))
    rng = np.random.default_rng(0)
    for name in ("ref", "samples"):
        np.savez(tmp_path / f"{name}.npz",
                 arr_0=rng.integers(0, 255, (11, 32, 32, 3), dtype=np.uint8))
    argv = ["--ref-batch", str(tmp_path / "ref.npz"),
            "--sample-batch", str(tmp_path / "samples.npz"), "--inception-weights", weights,
            "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, output in ((["-m", "regdit"], "one.json"),
                             (["-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "-m", "regdit"], "two.json")):
        run = subprocess.run([sys.executable, *launcher, "eval", *argv,
                              "--output", str(tmp_path / output)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["settings"]["num_processes"] == 2
    assert {k: one[k] for k in METRIC_NAMES} == {k: two[k] for k in METRIC_NAMES}


@pytest.mark.slow
def test_make_ref_on_two_processes_writes_the_reference_of_one(tmp_path):
    weights = str(save_random_inception_weights(tmp_path / "inception.pth"))
    np.savez(tmp_path / "images.npz",
             arr_0=np.random.default_rng(1).integers(0, 255, (7, 32, 32, 3), dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, output in ((["-m", "regdit"], "one.npz"),
                             (["-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "-m", "regdit"], "two.npz")):
        run = subprocess.run([sys.executable, *launcher, "eval",
                              "--make-ref", str(tmp_path / "images.npz"),
                              "--output", str(tmp_path / output), "--inception-weights", weights,
                              "--batch-size", "2"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("wrote ") == 1  # one process writes and says so
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert all(np.array_equal(one[key], two[key])
                   for key in ("arr_0", "mu", "sigma", "mu_s", "sigma_s"))

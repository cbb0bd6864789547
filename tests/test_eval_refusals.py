"""`regdit eval` refuses what it cannot score: a one-line error, no traceback, no file written, and
as early as the input allows (settings and reference before the first Inception forward)."""
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from regdit.commands import cli
from regdit.commands import evaluate as evaluate_module


@pytest.fixture(scope="session")
def weights(inception_weights):
    return inception_weights


@pytest.fixture
def no_inception(monkeypatch):
    """Fail the test if any Inception activation is computed."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an Inception activation was computed before the refusal")

    monkeypatch.setattr(evaluate_module, "compute_activations", forbidden)


def _images(count, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _statistics(**changes):
    """Reference statistics of the right shapes (zero covariances keep sqrtm cheap), with `changes`
    (None drops a key)."""
    statistics = {"mu": np.zeros(2048), "sigma": np.zeros((2048, 2048)), "mu_s": np.zeros(2023),
                  "sigma_s": np.zeros((2023, 2023)), **changes}
    return {key: value for key, value in statistics.items() if value is not None}


@pytest.fixture
def batches(tmp_path):
    """A reference (with statistics) and a sample .npz of 6 images each (16 px)."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(6, seed=1), **_statistics())
    np.savez(tmp_path / "samples.npz", arr_0=_images(6, seed=2))
    return str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")


def _refused(capsys, argv, *, stderr_before=False):
    """Run `regdit eval ARGV`; return the one-line error it exits with. Nothing else may reach
    stderr unless `stderr_before` (progress bars and warnings of a run that got as far as the
    Inception forwards)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *argv, "--device", "cpu"])
    message = exit_info.value.code  # sys.exit(message) prints it as the one line on stderr
    assert isinstance(message, str) and message.startswith("regdit eval: error: ") \
        and "\n" not in message
    err = capsys.readouterr().err
    assert "Traceback" not in err and "regdit eval: error" not in err
    if not stderr_before:
        assert err == ""
    return message


def _files(folder):
    return sorted(path.name for path in folder.iterdir())


# ---- settings, checked in one place before anything is read --------------------------------------


@pytest.mark.parametrize("flag", ["--batch-size", "--num-samples", "--ref-images"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_must_be_positive(capsys, batches, no_inception, flag, value):
    ref, samples = batches
    message = _refused(capsys, ["--ref-batch", ref, "--sample-batch", samples, flag, value])
    assert f"{flag} {value}: must be at least 1" in message


@pytest.mark.parametrize("case", ["missing folder", "folder as output", "file as folder"])
def test_unwritable_output_is_refused_before_the_evaluation(tmp_path, capsys, batches, weights,
                                                            no_inception, case):
    ref, samples = batches
    (tmp_path / "plain_file").write_text("")
    output, expected = {
        "missing folder": (tmp_path / "absent" / "metrics.json",
                           f"the folder {tmp_path / 'absent'} does not exist"),
        "folder as output": (tmp_path, "it is a folder"),
        "file as folder": (tmp_path / "plain_file" / "metrics.json",
                           "plain_file is a file, not a folder"),
    }[case]
    before = _files(tmp_path)
    message = _refused(capsys, ["--ref-batch", ref, "--sample-batch", samples,
                                "--output", str(output), "--inception-weights", weights])
    assert f"cannot write {output}" in message and expected in message
    assert _files(tmp_path) == before


def test_unwritable_make_ref_output_is_refused_before_reading_images(tmp_path, capsys, weights,
                                                                     no_inception):
    output = tmp_path / "absent" / "ref.npz"
    message = _refused(capsys, ["--make-ref", str(tmp_path), "--output", str(output),
                                "--inception-weights", weights])
    assert f"cannot write {output}" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_refused(tmp_path, capsys, batches, weights, no_inception):
    ref, samples = batches
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        message = _refused(capsys, ["--ref-batch", ref, "--sample-batch", samples, "--output",
                                    str(locked / "metrics.json"), "--inception-weights", weights])
    finally:
        locked.chmod(0o700)
    assert f"the folder {locked} is not writable" in message and _files(locked) == []


def test_default_output_beside_the_samples_is_checked_too(tmp_path, capsys, weights, no_inception):
    np.savez(tmp_path / "ref.npz", arr_0=_images(6))
    message = _refused(capsys, ["--ref-batch", str(tmp_path / "ref.npz"),
                                "--sample-batch", str(tmp_path / "gone" / "samples.npz"),
                                "--inception-weights", weights])
    assert f"cannot write {tmp_path / 'gone' / 'samples.metrics.json'}" in message


def test_missing_weights_are_refused_before_any_activation(tmp_path, capsys, batches, no_inception):
    ref, samples = batches
    message = _refused(capsys, ["--ref-batch", ref, "--sample-batch", samples,
                                "--inception-weights", str(tmp_path / "absent.pth")])
    assert f"Inception weights not found at {tmp_path / 'absent.pth'}" in message


# ---- inputs, checked before the first Inception forward ------------------------------------------


@pytest.mark.parametrize("statistics, expected", [
    (_statistics(mu=np.zeros(10), sigma=np.zeros((10, 10))),
     "mu is float64 of shape (10,), expected floats of shape (2048,)"),
    (_statistics(sigma_s=np.zeros((2023, 7))), "sigma_s is float64 of shape (2023, 7), expected"),
    (_statistics(mu=np.array([None] * 2048, dtype=object)),
     "mu is object of shape (2048,), expected floats"),
    (_statistics(mu=np.full(2048, np.nan)), "mu, sigma hold non-finite values"),
    (_statistics(sigma=None, mu_s=None), "has mu but no sigma, mu_s"),
])
def test_bad_reference_statistics_are_refused_before_any_activation(tmp_path, capsys, weights,
                                                                    no_inception, statistics,
                                                                    expected):
    np.savez(tmp_path / "ref.npz", arr_0=_images(6), **statistics)
    np.savez(tmp_path / "samples.npz", arr_0=_images(6, seed=1))
    message = _refused(capsys, ["--ref-batch", str(tmp_path / "ref.npz"), "--sample-batch",
                                str(tmp_path / "samples.npz"), "--inception-weights", weights])
    assert str(tmp_path / "ref.npz") in message and expected in message and "--make-ref" in message
    assert not (tmp_path / "samples.metrics.json").exists()


@pytest.mark.slow
def test_resolution_mismatch_is_refused_unless_allowed(tmp_path, capsys, weights, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=_images(6, size=16), **_statistics())
    np.savez(tmp_path / "samples.npz", arr_0=_images(6, size=20, seed=1))
    argv = ["--ref-batch", str(tmp_path / "ref.npz"),
            "--sample-batch", str(tmp_path / "samples.npz"), "--inception-weights", weights]
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "compute_activations",
                      lambda *args, **kwargs: pytest.fail("computed"))
        message = _refused(capsys, argv)
    assert "is 16x16 px but the samples" in message and "are 20x20 px" in message
    assert "--allow-resolution-mismatch" in message \
        and not (tmp_path / "samples.metrics.json").exists()

    cli.main(["eval", *argv, "--allow-resolution-mismatch", "--device", "cpu"])
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "16x16 px but the samples" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert (tmp_path / "samples.metrics.json").exists()


# ---- results that are not scores -----------------------------------------------------------------


def _broken_weights(weights, path, name, value):
    state_dict = torch.load(weights, weights_only=True)
    state_dict[name] = torch.full_like(state_dict[name], value)
    torch.save(state_dict, path)
    return str(path)


@pytest.mark.slow
def test_non_finite_metric_is_refused_naming_it_and_no_metrics_are_written(tmp_path, capsys,
                                                                           batches, weights):
    ref, samples = batches
    # logits = inf
    overflowing = _broken_weights(weights, tmp_path / "overflow.pth", "fc.weight", 1e38)
    message = _refused(capsys, ["--ref-batch", ref, "--sample-batch", samples, "--output",
                                str(tmp_path / "metrics.json"), "--inception-weights", overflowing],
                       stderr_before=True)
    assert "Inception Score = nan: not finite, so no metrics file is written" in message
    assert "likely cause: the Inception logits overflow or are not finite" in message \
        and "FID" not in message
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow  # a whole evaluation
def test_non_finite_features_give_nan_fid_not_a_crash(tmp_path, capsys, batches, weights):
    ref, samples = batches
    broken = _broken_weights(weights, tmp_path / "broken.pth", "Conv2d_1a_3x3.conv.weight", 1e38)
    message = _refused(capsys, ["--ref-batch", ref, "--sample-batch", samples,
                                "--inception-weights", broken], stderr_before=True)
    assert "FID = nan, sFID = nan" in message and "non-finite pool_3 features" in message
    assert not (tmp_path / "samples.metrics.json").exists()


def test_make_ref_with_non_finite_features_writes_no_reference(tmp_path, capsys, weights):
    folder = tmp_path / "images"
    folder.mkdir()
    np.savez(folder / "images.npz", arr_0=_images(5))
    broken = _broken_weights(weights, tmp_path / "broken.pth", "Conv2d_1a_3x3.conv.weight", 1e38)
    message = _refused(capsys, ["--make-ref", str(folder / "images.npz"),
                                "--output", str(tmp_path / "ref.npz"),
                                "--inception-weights", broken], stderr_before=True)
    assert "Inception features of" in message \
        and "are not finite, so no reference is written" in message
    assert not (tmp_path / "ref.npz").exists()


# ---- the real process ----------------------------------------------------------------------------


@pytest.mark.slow
def test_command_prints_exactly_one_error_line_and_exits_non_zero(tmp_path, batches):
    ref, samples = batches
    result = subprocess.run([sys.executable, "-m", "regdit", "eval", "--ref_batch", ref,
                             "--sample_batch", samples,
                             "--output", str(tmp_path / "absent" / "metrics.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 \
        and lines[0].startswith("regdit eval: error: cannot write "), result.stderr


def test_a_reference_whose_header_claims_a_huge_sigma_is_refused_before_loading(
        tmp_path, capsys, weights, no_inception):
    """A crafted .npy header (sigma of 10^6 x 10^6 float64, 8 TB) with no data behind it: refused
    from the header."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(6), **_statistics(sigma=None))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10 ** 6, 10 ** 6)})
    with zipfile.ZipFile(tmp_path / "ref.npz", "a") as archive:
        archive.writestr("sigma.npy", header.getvalue())
    np.savez(tmp_path / "samples.npz", arr_0=_images(6, seed=1))
    message = _refused(capsys, ["--ref-batch", str(tmp_path / "ref.npz"), "--sample-batch",
                                str(tmp_path / "samples.npz"), "--inception-weights", weights])
    assert ("sigma is float64 of shape (1000000, 1000000), expected floats of shape (2048, 2048)"
            in message)

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, tiny_config
from PIL import Image

from regdit import RegditError
from regdit.commands import train as train_module
from regdit.commands.cli import main as cli_main
from regdit.commands.prepare import (
    PrepareImagesConfig,
    PrepareLatentsConfig,
    prepare_images,
    prepare_latents,
)
from regdit.commands.train import (
    EvalSampling,
    ShardedBatchSampler,
    TrainConfig,
    setup,
    sit_config,
    step_randomness,
    train,
)
from regdit.core.interpolants import path_coefficients
from regdit.core.loss import REGLoss
from regdit.core.models import SiT
from regdit.run.experiment import SamplePreview
from regdit.storage.checkpoint import load_checkpoint
from regdit.storage.data import open_dataset
from regdit.storage.encoders import load_encoders, save_random_encoder


def assert_states_equal(a, b, exact=True):
    for key in ("model", "ema"):
        for name, value in a[key].items():
            if exact:
                assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
            else:
                torch.testing.assert_close(value, b[key][name], atol=2e-5, rtol=1e-4,
                                           msg=f"{key}.{name}")


def test_one_step_equals_hand_computed_loss_adamw_and_ema(tiny_data):
    config = tiny_config(tiny_data, max_train_steps=1, exp_name="one_step", learning_rate=1e-3,
                         ema_decay=0.9)
    result = train(config)

    # the same step by hand: initial weights, first batch, the step's random draws
    dataset = open_dataset(config.data_dir, 32, seed=config.seed)
    encoder = load_encoders(config.enc_type, 32, config.enc_path)[0]
    torch.manual_seed(config.seed)
    model = SiT(sit_config(config, 3, 32, [encoder.embed_dim]))
    initial = {k: v.clone() for k, v in model.named_parameters()}
    indices = next(iter(ShardedBatchSampler(len(dataset), 8, 8, 0, 1, config.seed, epoch=0)))
    images, moments, labels = (torch.stack([torch.as_tensor(dataset[i][j]) for i in indices])
                               for j in range(3))
    with setup(config) as run:  # the run's own draws of step 0
        draws = step_randomness(run, 0)
    mean, std = moments.chunk(2, dim=1)
    x = mean + std * draws["posterior"]  # pixel space: scale 1
    cls_token, dense = encoder(images)
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1)
                                      for c in path_coefficients(draws["time"], "linear"))
    x_t = alpha[..., None, None] * x + sigma[..., None, None] * draws["noise"]
    cls_t = alpha * cls_token + sigma * draws["noise_cls"]
    y = torch.where(draws["drop"], 4, labels)
    model.train()
    v, zs, cls_v = model(x_t, draws["time"], y, cls_token=cls_t,
                         force_drop_ids=torch.zeros(8, dtype=torch.bool))
    target = d_alpha[..., None, None] * x + d_sigma[..., None, None] * draws["noise"]
    denoise = ((v - target) ** 2).mean()
    cls_loss = ((cls_v - (d_alpha * cls_token + d_sigma * draws["noise_cls"])) ** 2).mean()
    proj = -F.cosine_similarity(zs[0], dense, dim=-1).mean()
    (denoise + 0.5 * proj + 0.03 * cls_loss).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    clip = min(1.0, 1.0 / (norm.item() + 1e-6))
    trained = dict(result["model"].named_parameters())
    ema = dict(result["ema"].named_parameters())
    for name, p0 in initial.items():
        if name not in grads:
            torch.testing.assert_close(trained[name], p0)
            continue
        g = grads[name] * clip
        # AdamW step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps); weight decay
        # 0
        expected = p0 - 1e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(trained[name], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ema[name], 0.9 * p0 + 0.1 * expected, atol=1e-6, rtol=1e-5)
    assert result["metrics"][-1]["loss_final"] \
        == pytest.approx((denoise + 0.5 * proj + 0.03 * cls_loss).item(), rel=1e-5)


def test_killed_run_resumes_bitwise(tiny_data, monkeypatch):
    reference = train(tiny_config(tiny_data, exp_name="uninterrupted"))
    crashing = tiny_config(tiny_data, exp_name="killed")
    calls = {"n": 0}
    real_update = train_module.update_ema

    def crash_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-epoch, two steps after the checkpoint of step 3
            raise KeyboardInterrupt
        real_update(*args)
    monkeypatch.setattr(train_module, "update_ema", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(crashing)
    monkeypatch.undo()
    assert sorted(p.name for p in (tiny_data / "exps" / "killed" / "checkpoints").iterdir()) \
        == ["0000003.pt"]
    resumed = train(crashing)  # the same command again
    assert resumed["steps"] == 6
    final, expected = (load_checkpoint(r["checkpoint"]) for r in (resumed, reference))
    assert_states_equal(final, expected, exact=True)
    for a, b in zip(final["opt"]["state"].values(), expected["opt"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_batch(tiny_data):
    single = train(tiny_config(tiny_data, exp_name="single", max_train_steps=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "regdit", "train", "--data-dir", str(tiny_data / "data"), "--resolution", "32",
               "--model", "SiT-S/8", "--depth", "2", "--hidden-size", "64", "--num-heads", "2",
               "--encoder-depth", "1", "--projector-dim", "64",
               "--enc-path", str(tiny_data / "encoder"), "--num-classes", "4", "--batch-size", "8",
               "--max-train-steps", "3", "--log-every", "2", "--checkpointing-steps", "3",
               "--sampling-steps", "0", "--num-workers", "0",
               "--output-dir", str(tiny_data / "exps"), "--exp-name", "double"]
    subprocess.run(command, check=True, env=env, capture_output=True)
    double = load_checkpoint(tiny_data / "exps" / "double" / "checkpoints" / "0000003.pt")
    assert_states_equal(double, load_checkpoint(single["checkpoint"]), exact=False)


def test_gradient_accumulation_equals_the_full_batch(tiny_data):
    full = train(tiny_config(tiny_data, exp_name="full", max_train_steps=3))
    accumulated = train(tiny_config(tiny_data, exp_name="accumulated", max_train_steps=3,
                                    gradient_accumulation_steps=2))
    assert_states_equal(load_checkpoint(accumulated["checkpoint"]),
                        load_checkpoint(full["checkpoint"]), exact=False)


def test_official_checkpoint_resumes_training(tmp_path, official_tiny):
    """The official tiny checkpoint (8x8x4 latents, z_dims [32]) continues training from its
    step."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "raw" / f"c{c}").mkdir(parents=True)
        image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        image.save(tmp_path / "raw" / f"c{c}" / "0.png")
    prepare_images(PrepareImagesConfig(source=str(tmp_path / "raw"), dest=str(tmp_path / "images"),
                                       resolution=64, workers=0))
    prepare_latents(PrepareLatentsConfig(source=str(tmp_path / "images"),
                                         dest=str(tmp_path / "data"), vae=str(tmp_path / "vae"),
                                         batch_size=10, workers=0))
    # DINOv2 at 64 px sees 56 px: patch 14 gives the 4x4 grid of the SiT's 8x8 latents with patch 2
    save_random_encoder("dinov2-vit-b", tmp_path / "encoder", patch_size=14, embed_dim=32)
    checkpoints = tmp_path / "exps" / "official" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "0000001.pt").write_bytes((FIXTURES / "official_tiny_a_ckpt.pt").read_bytes())
    config = TrainConfig(data_dir=str(tmp_path / "data"), resolution=64, model="SiT-S/2", depth=4,
                         hidden_size=64, num_heads=4, encoder_depth=2, projector_dim=128,
                         enc_path=str(tmp_path / "encoder"), num_classes=10, batch_size=5,
                         max_train_steps=3, log_every=1, checkpointing_steps=3, sampling_steps=0,
                         num_workers=0, output_dir=str(tmp_path / "exps"), exp_name="official",
                         resume_step=1)
    result = train(config)
    assert result["steps"] == 3 and [m["step"] for m in result["metrics"]] == [2, 3]
    official = load_checkpoint(checkpoints / "0000001.pt")
    resumed = load_checkpoint(checkpoints / "0000003.pt")
    assert not torch.equal(resumed["model"]["blocks.0.attn.qkv.weight"],
                           official["model"]["blocks.0.attn.qkv.weight"])
    assert resumed["opt"]["state"][1]["step"].item() == 3  # the official AdamW state was continued


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_data, monkeypatch):
    real_loss = REGLoss.__call__

    def nan_loss(self, *args, **kwargs):
        loss, logs = real_loss(self, *args, **kwargs)
        return loss * float("nan"), {**logs, "loss_final": logs["loss_final"] * float("nan")}
    config = tiny_config(tiny_data, exp_name="nan", max_train_steps=3, checkpointing_steps=1,
                         log_every=1)
    train(config)
    monkeypatch.setattr(REGLoss, "__call__", nan_loss)
    with pytest.raises(RegditError,
                       match="non-finite loss or gradient before step 4.*last good checkpoint"):
        train(dataclasses.replace(config, max_train_steps=5))
    checkpoints = sorted(p.name for p in (tiny_data / "exps" / "nan" / "checkpoints").iterdir())
    assert checkpoints == ["0000001.pt", "0000002.pt", "0000003.pt"]


@pytest.mark.slow
def test_sample_grid_and_metrics_are_written(tiny_data):
    result = train(tiny_config(tiny_data, exp_name="grid", max_train_steps=2, sampling_steps=2))
    grid = Image.open(result["exp_dir"] / "samples" / "0000002.png")
    assert grid.size == (4 * 32, 4 * 32)
    lines = (result["exp_dir"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 \
        and all(k in lines[0] for k in ("loss_final", "proj_loss", "loss_mean_cls", "grad_norm"))
    metrics, = result["metrics"]
    encoder, = load_encoders("dinov2-vit-b", 32, str(tiny_data / "encoder"))
    flops_per_image = 3 * result["model"].flops() + encoder.flops()
    assert metrics["tflops_per_process"] \
        == pytest.approx(metrics["images_per_sec"] * flops_per_image / 1e12)


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "7", "--gradient-accumulation-steps", "2"], "must be divisible"),
    (["--model", "SiT-S/4"], "gives 1\\+16 tokens .* the SiT has 1\\+64"),
])
def test_bad_settings_fail_before_training(tiny_data, flags, message, capsys):
    base = ["train", "--data-dir", str(tiny_data / "data"), "--resolution", "32",
            "--model", "SiT-S/8", "--depth", "2", "--hidden-size", "64", "--num-heads", "2",
            "--encoder-depth", "1", "--enc-path", str(tiny_data / "encoder"), "--num-classes", "4",
            "--batch-size", "8", "--num-workers", "0", "--max-train-steps", "1",
            "--output-dir", str(tiny_data / "exps"), "--exp-name", "bad"]
    with pytest.raises(SystemExit) as error:
        cli_main(base + flags)
    assert "regdit train: error:" in str(error.value)
    import re
    assert re.search(message, str(error.value))


@pytest.mark.parametrize("argv,message", [
    (["--learning-rat", "1e-4"],
     "unrecognized arguments: --learning-rat (did you mean --learning-rate?) 1e-4"),
    (["--model", "SiT-Q/2"], "argument --model: invalid choice: 'SiT-Q/2'"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", *argv])
    err = capsys.readouterr().err
    assert err.startswith(f"regdit train: error: {message}") \
        and err.endswith(" (see regdit train --help)\n")
    assert err.count("\n") == 1, err


def test_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "train", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err \
        == "\nregdit train: interrupted (rerun the same command to continue)\n"


def test_yaml_config_and_preset_precedence(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config: seen.setdefault("config", config))
    (tmp_path / "c.yaml").write_text("learning-rate: 2.0e-4\nbatch_size: 64\n")
    cli_main(["train", "--preset", "reg-sit-b2-dinov2b", "--config", str(tmp_path / "c.yaml"),
              "--batch-size", "32"])
    config = seen["config"]
    assert config.model == "SiT-B/2" and config.encoder_depth == 4  # preset
    assert config.learning_rate == 2e-4  # YAML over preset and default
    assert config.batch_size == 32  # explicit flag over YAML
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(SystemExit, match="unknown settings learning_rat"):
        cli_main(["train", "--config", str(tmp_path / "bad.yaml")])
    assert set(TrainConfig.PRESETS) >= {"reg-sit-xl2-dinov2b", "reg-sit-b2-dinov2b",
                                        "repa-sit-xl2-dinov2b", "sit-xl2"}


def test_rerun_with_other_settings_refuses_to_resume(tiny_data):
    train(tiny_config(tiny_data, exp_name="settings", max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(RegditError,
                       match="trained with --learning-rate 0.0001, not 0.01.*new --exp-name"):
        train(tiny_config(tiny_data, exp_name="settings", max_train_steps=4, learning_rate=1e-2))
    result = train(tiny_config(tiny_data, exp_name="settings", max_train_steps=3, log_every=1))
    assert result["steps"] == 3


def test_fewer_classes_than_the_dataset_is_an_error(tiny_data):
    with pytest.raises(RegditError,
                       match="has 4 classes but --num-classes is 3: pass --num-classes 4"):
        train(tiny_config(tiny_data, exp_name="classes", num_classes=3))


def test_no_label_dropout_previews_without_guidance(tiny_data, tmp_path):
    """Without label dropout the model has no null class: its preview is the guidance-free grid of
    the official ODE preview, drawn from the run's fixed noise."""
    config = tiny_config(tiny_data, exp_name="no_cfg", class_dropout_prob=0.0, max_train_steps=2,
                         sampling_steps=2)
    result = train(config)
    preview = SamplePreview(config, None, (3, 32, 32), result["ema"].cls_shape, torch.device("cpu"))
    assert (preview.sampling.sampler, preview.sampling.num_steps, preview.sampling.cfg_scale) \
        == ("ode", 50, 1.0)
    preview.save(result["ema"], tmp_path / "expected.png")
    saved, expected = (np.asarray(Image.open(path))
                       for path in (result["exp_dir"] / "samples" / "0000002.png",
                                    tmp_path / "expected.png"))
    assert saved.shape == (128, 128, 3) and np.array_equal(saved, expected)


def test_a_runs_config_yaml_is_a_valid_config(tiny_data, monkeypatch):
    result = train(tiny_config(tiny_data, exp_name="yaml", max_train_steps=1))
    written = result["exp_dir"] / "config.yaml"
    assert "mixed_precision: null" in written.read_text()  # unset settings are written as null
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda config: seen.update(config=config))
    cli_main(["train", "--config", str(written)])
    assert seen["config"] == tiny_config(tiny_data, exp_name="yaml", max_train_steps=1)
    (tiny_data / "hand.yaml").write_text("mixed-precision: no\nbatch-size: '16'\n"
                                         "learning-rate: 1e-4\n")
    cli_main(["train", "--config", str(tiny_data / "hand.yaml")])
    # YAML 1.1: no is false
    assert (seen["config"].mixed_precision, seen["config"].batch_size) == ("no", 16)


@pytest.mark.parametrize("text,message", [
    ("path-type: cosin\n", "path_type 'cosin' is not one of linear, cosine"),
    ("method: [reg\n", "is not valid YAML"),
    ("batch_size: abc\n", "c.yaml: batch_size 'abc' is not a valid int"),
    ("batch_size: 3.5\n", "c.yaml: batch_size 3.5 is not a valid int"),
    ("compile: maybe\n", "c.yaml: compile 'maybe' is not true or false"),
])
def test_bad_yaml_values_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit, match=message):
        cli_main(["train", "--config", str(tmp_path / "c.yaml")])


def test_tracker_must_be_installed(tiny_data, monkeypatch):
    import accelerate.utils
    config = tiny_config(tiny_data, exp_name="untracked", max_train_steps=1,
                         report_to="tensorboard")
    # as on a machine without it
    monkeypatch.setattr(train_module, "is_tensorboard_available", lambda: False)
    with pytest.raises(RegditError,
                       match="tensorboard is not installed; pip install -e '.\\[tracking\\]'"):
        train(config)
    # the dev extra installs it: the next test uses it
    assert accelerate.utils.is_tensorboard_available()


@pytest.mark.slow
def test_tensorboard_receives_metrics_and_preview_grids(tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(tiny_config(tiny_data, exp_name="tracked", max_train_steps=2, log_every=1,
                      sampling_steps=2, report_to="tensorboard"))
    event_file = next((tiny_data / "exps" / "tracked" / "logs").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert [event.step for event in events.Scalars("loss_final")] == [1, 2]
    image, = events.Images("samples")
    assert (image.step, image.width, image.height) == (2, 4 * 32, 4 * 32)


@pytest.mark.parametrize("method", ["repa", "sit"])
def test_baselines_train_from_the_same_code(tiny_data, method):
    result = train(tiny_config(tiny_data, exp_name=method, method=method, max_train_steps=2,
                               log_every=1))
    names = result["model"].state_dict().keys()
    assert "cls_projectors2.weight" not in names \
        and ("projectors.0.0.weight" in names) == (method == "repa")
    assert result["metrics"][-1]["loss_mean_cls"] == 0 \
        and np.isfinite(result["metrics"][-1]["loss_final"])
    assert (result["metrics"][-1]["proj_loss"] == 0) == (method == "sit")


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one(tiny_data, capsys):
    reference = train(tiny_config(tiny_data, exp_name="intact", max_train_steps=4,
                                  checkpointing_steps=2))
    config = tiny_config(tiny_data, exp_name="corrupt", max_train_steps=4, checkpointing_steps=2)
    latest = train(config)["checkpoint"]
    # cut short, as by a full disk outside regdit's atomic writes
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(RegditError,
                       match=r"0000004.pt is unreadable .*; or pass --resume-step with one of 2$"):
        train(dataclasses.replace(config, resume_step=4))
    capsys.readouterr()
    resumed = train(config)
    printed = capsys.readouterr()
    assert "0000004.pt is unreadable" in printed.err and "resumed from" in printed.out \
        and "0000002.pt" in printed.out
    assert_states_equal(load_checkpoint(resumed["checkpoint"]),
                        load_checkpoint(reference["checkpoint"]))
    lines = (resumed["exp_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]  # each step once after the resume
    for path in (resumed["exp_dir"] / "checkpoints").iterdir():
        path.write_bytes(b"")
    with pytest.raises(RegditError, match="no readable checkpoint in .*checkpoints: "
                                          "restore one, or move them away"):
        train(config)


def test_a_checkpoint_copied_into_a_new_experiment_continues_there(tiny_data, capsys):
    """The official way to continue a run: copy its checkpoint into another experiment's folder. The
    experiment name is not a training setting; a moved dataset is said, not silent."""
    source = train(tiny_config(tiny_data, exp_name="original", max_train_steps=2,
                               checkpointing_steps=2))
    copy = tiny_data / "exps" / "continued" / "checkpoints"
    copy.mkdir(parents=True)
    (copy / "0000002.pt").write_bytes(source["checkpoint"].read_bytes())
    moved = tiny_data / "data-moved"
    moved.symlink_to(tiny_data / "data")
    capsys.readouterr()
    result = train(tiny_config(tiny_data, exp_name="continued", max_train_steps=3,
                               data_dir=str(moved)))
    assert result["steps"] == 3
    assert (f"note: resuming with --data-dir {moved} (the run was trained with "
            f"{tiny_data / 'data'})") in capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tiny_data):
    """A reference batch of the tiny data's images and random Inception weights (the evaluator's
    arithmetic is what is under test, not the network's training)."""
    from regdit.commands.evaluate import make_reference, save_random_inception_weights
    weights = save_random_inception_weights(tiny_data / "inception.pth")
    make_reference(tiny_data / "images", tiny_data / "ref.npz", inception_weights=weights,
                   batch_size=4, num_images=8)
    return dict(ref_batch=str(tiny_data / "ref.npz"), inception_weights=str(weights))


EVAL_SAMPLING = dict(num_steps=3, cfg_scale=1.5, cls_cfg_scale=1.5)
EVAL = dict(eval_every=2, eval_samples=6, eval_batch_size=4)
EVAL_FLAGS = {**EVAL, **{f"eval_{name}": value for name, value in EVAL_SAMPLING.items()}}


@pytest.fixture(scope="module")
def evaluated(tiny_data, reference):
    """A run evaluated at steps 2 and 4, killed during its second evaluation and rerun (an
    evaluation costs two 2048 x 2048 matrix square roots: the tests share this one run)."""
    from regdit.commands.monitor import TrainingEvaluation
    config = tiny_config(tiny_data, exp_name="evaluated", max_train_steps=4, checkpointing_steps=4,
                         **EVAL, eval=EvalSampling(**EVAL_SAMPLING), **reference)
    real_call, calls = TrainingEvaluation.__call__, []

    def killed_in_the_second_evaluation(self, ema, stop):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, ema, stop)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingEvaluation, "__call__", killed_in_the_second_evaluation)
        with pytest.raises(KeyboardInterrupt):
            train(config)
    files = sorted(p.name for p in (tiny_data / "exps" / "evaluated" / "checkpoints").iterdir())
    # the rerun redoes the evaluation of step 4 first, then finds the run done
    result = train(config)
    return dict(config=config, result=result, files_after_kill=files)


def logged_evaluations(exp_dir):
    return [entry for entry in map(json.loads, (exp_dir / "metrics.jsonl").read_text().splitlines())
            if "eval/fid" in entry]


EVAL_METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


@pytest.mark.slow
def test_evaluation_while_training_equals_sample_then_eval(evaluated, reference, tiny_data):
    from regdit.commands.evaluate import evaluate
    from regdit.commands.sample import SampleConfig, sample
    from regdit.core.sampling import Sampling
    config, result = evaluated["config"], evaluated["result"]
    checkpoints = result["exp_dir"] / "checkpoints"
    assert evaluated["files_after_kill"] == ["0000002.pt", "0000004.pt", "best.pt"]
    evaluations = logged_evaluations(result["exp_dir"])
    assert [entry["step"] for entry in evaluations] == [2, 4] \
        and result["evaluations"] == evaluations[1:]
    # the redone evaluation has the numbers of the two commands on the step's checkpoint
    entry = evaluations[1]
    npz = sample(SampleConfig(ckpt=str(checkpoints / "0000004.pt"), sample_dir=str(tiny_data / "s"),
                              num_fid_samples=6, per_proc_batch_size=4,
                              sampling=Sampling(**EVAL_SAMPLING), global_seed=config.seed))
    scores = evaluate(reference["ref_batch"], npz, reference["inception_weights"], batch_size=4)
    assert {name: entry[f"eval/{name}"] for name in EVAL_METRICS} \
        == {name: scores[name] for name in EVAL_METRICS}
    best = min(evaluations, key=lambda entry: entry["eval/fid"])["step"]
    assert load_checkpoint(checkpoints / "best.pt")["steps"] == best


@pytest.mark.slow
def test_an_autoguided_evaluation_while_training_equals_sample_then_eval(evaluated, reference,
                                                                         tiny_data):
    """`--eval-guide-ckpt`: the evaluation of step 2 guided by the evaluated run's first
    checkpoint has the numbers of `regdit sample --guide-ckpt` and `regdit eval` on step 2."""
    from regdit.commands.evaluate import evaluate
    from regdit.commands.sample import SampleConfig, sample
    from regdit.core.sampling import Sampling
    guide = str(evaluated["result"]["exp_dir"] / "checkpoints" / "0000002.pt")
    sampling = dict(EVAL_SAMPLING, cls_cfg_scale=0.0)
    config = tiny_config(tiny_data, exp_name="eval-guided", max_train_steps=2,
                         checkpointing_steps=2, **EVAL,
                         eval=EvalSampling(**sampling, guide_ckpt=guide), **reference)
    result = train(config)
    entry, = logged_evaluations(result["exp_dir"])
    npz = sample(SampleConfig(ckpt=str(result["exp_dir"] / "checkpoints" / "0000002.pt"),
                              sample_dir=str(tiny_data / "s-guided"), num_fid_samples=6,
                              per_proc_batch_size=4, global_seed=config.seed,
                              sampling=Sampling(**sampling, guide_ckpt=guide)))
    scores = evaluate(reference["ref_batch"], npz, reference["inception_weights"], batch_size=4)
    assert {name: entry[f"eval/{name}"] for name in EVAL_METRICS} \
        == {name: scores[name] for name in EVAL_METRICS}


@pytest.mark.slow
def test_two_processes_evaluate_like_one(evaluated, reference, tiny_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**EVAL_FLAGS, **reference}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "regdit", "train", "--data-dir", str(tiny_data / "data"), "--resolution", "32",
               "--model", "SiT-S/8", "--depth", "2", "--hidden-size", "64", "--num-heads", "2",
               "--encoder-depth", "1", "--projector-dim", "64",
               "--enc-path", str(tiny_data / "encoder"), "--num-classes", "4", "--batch-size", "8",
               "--max-train-steps", "2", "--log-every", "2", "--checkpointing-steps", "3",
               "--sampling-steps", "0", "--num-workers", "0",
               "--output-dir", str(tiny_data / "exps"), "--exp-name", "eval_double", *flags]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    double, = logged_evaluations(tiny_data / "exps" / "eval_double")
    # step 2 of the same training on one process
    single = logged_evaluations(evaluated["result"]["exp_dir"])[0]
    # the weights differ by the float rounding of the gradient all-reduce, the evaluation itself
    # adds none (the exact equality of one evaluation on 1 and 2 processes is test_evaluate's)
    assert {name: double[f"eval/{name}"] for name in EVAL_METRICS} == pytest.approx(
        {name: single[f"eval/{name}"] for name in EVAL_METRICS}, rel=1e-4)


def test_an_unusable_reference_is_refused_before_training(tiny_data, reference):
    with pytest.raises(RegditError, match="--eval-every 2 needs --ref-batch REF.npz"):
        train(tiny_config(tiny_data, exp_name="no_ref", **EVAL))
    np.savez(tiny_data / "ref64.npz", arr_0=np.zeros((8, 64, 64, 3), np.uint8))
    with pytest.raises(RegditError,
                       match="ref64.npz is 64x64 px but the samples of this run are 32x32 px"):
        train(tiny_config(tiny_data, exp_name="no_ref", **EVAL,
                          **{**reference, "ref_batch": str(tiny_data / "ref64.npz")}))
    assert not (tiny_data / "exps" / "no_ref").exists()


@pytest.mark.slow
def test_report_overlays_runs_with_and_without_evaluations(tiny_data, evaluated):
    from regdit.commands.cli import main
    evaluated = evaluated["result"]["exp_dir"]
    plain = train(tiny_config(tiny_data, exp_name="report_plain", max_train_steps=4,
                              log_every=1))["exp_dir"]
    for exp_dirs, name in (([plain], "plain.png"), ([evaluated, plain], "both.png"),
                           ([evaluated], "page.html")):
        main(["report", *map(str, exp_dirs), "--output", str(tiny_data / name)])
    for name in ("plain.png", "both.png"):
        image = np.asarray(Image.open(tiny_data / name).convert("L"), dtype=float)
        # drawn on, not blank
        assert image.shape == (900, 1600) and image.std() > 20 and (image < 128).mean() > 0.01
    page = (tiny_data / "page.html").read_text()
    assert "<td>evaluated</td>" in page and "data:image/png;base64," in page
    assert re.search(r"<td>\d+\.\d{3} at step [24]</td>", page)  # the best FID and its step
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        main(["report", str(tiny_data), "--output", str(tiny_data / "x.png")])


def test_resume_on_another_accumulation_split(tiny_data):
    """The global batch and every draw are the same for any split into processes and accumulation
    steps, so a run may continue on half the GPUs with twice the accumulation."""
    config = tiny_config(tiny_data, exp_name="split", max_train_steps=2, checkpointing_steps=2)
    train(config)
    result = train(dataclasses.replace(config, max_train_steps=3, gradient_accumulation_steps=2))
    assert result["steps"] == 3
    assert "resume_step: 0" in (result["exp_dir"] / "config.yaml").read_text()

"""`hf://` paths served from a Hugging Face cache filled in the test (offline, no network),
from_pretrained / save_pretrained, and `regdit export --push-to-hub` against a local stand-in for
the Hub API (test_outputs.LocalHub)."""
import http.server
import json
import re
import shlex
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from conftest import FIXTURES, cli_error
from PIL import Image
from safetensors import safe_open
from test_outputs import local_hub_online
from test_prepare_latents import tiny_vae

from regdit import RegditError
from regdit.commands.cli import main as cli_main
from regdit.commands.cli import parse_config
from regdit.commands.evaluate import (
    EvalConfig,
    inception_weights_path,
    load_inception,
    output_path,
    save_random_inception_weights,
)
from regdit.commands.export import ExportConfig, export
from regdit.core.models import SiT, SiTConfig
from regdit.storage.checkpoint import from_pretrained, load_checkpoint, save_pretrained
from regdit.storage.encoders import load_encoders, save_random_encoder
from regdit.storage.hub import parse, resolve_path
from regdit.storage.vae import load_vae

OFFICIAL = FIXTURES / "official_tiny_a_ckpt.pt"
README = Path(__file__).resolve().parents[1] / "README.md"
COMMIT, COMMIT_V1 = "a" * 40, "b" * 40


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args):
        raise OSError("network is off in tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hub(monkeypatch, tmp_path, no_network):
    """An offline Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1); `put(repo, path, source)`
    stores a file or folder in the layout huggingface_hub writes for a download and reads offline:
    `{models|datasets}--OWNER--REPO/snapshots/COMMIT/PATH` with `refs/REVISION` holding COMMIT."""
    cache = tmp_path / "hf-cache"
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(int(value)) if value is True else value)
        # read at import: patch the module too
        monkeypatch.setattr(huggingface_hub.constants, name, value)

    def put(repo, path, source, revision="main", commit=COMMIT, kind="models"):
        root = cache / f"{kind}--{repo.replace('/', '--')}"
        target = root / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / revision).write_text(commit)
        return f"hf://{'datasets/' if kind == 'datasets' else ''}{repo}/{path}"
    return put


def test_hub_paths_parse_in_both_spellings():
    trailing, leading = parse("hf://o/r/a/b.pt@refs/pr/1"), parse("hf://o/r@v1/a/b.pt")
    assert ((trailing.repo_id, trailing.path, trailing.revision, trailing.is_file)
            == ("o/r", "a/b.pt", "refs/pr/1", True))
    assert (leading.repo_id, leading.path, leading.revision) == ("o/r", "a/b.pt", "v1")
    dataset, root, folder = parse("hf://datasets/o/r/ref.npz"), parse("hf://o/r"), parse("hf://o/r/vae/")
    assert dataset.repo_type == "dataset"
    assert dataset.download_command() == "hf download o/r ref.npz --repo-type dataset"
    assert not root.is_file and root.path == "" and root.download_command() == "hf download o/r"
    assert folder.path == "vae" and folder.download_command() == "hf download o/r --include 'vae/*'"
    assert leading.download_command() == "hf download o/r a/b.pt --revision v1"
    assert leading.at("a/config.json") == "hf://o/r/a/config.json@v1"
    for bad in ("hf://o", "hf://o/", "hf://o--x/r/f.pt", "hf://o/r@a/f.pt@b"):
        with pytest.raises(RegditError, match="hf://"):
            parse(bad)
    # not a Hub path: nothing to fetch
    assert resolve_path("local/dir", "VAE folder") == Path("local/dir")


@pytest.mark.parametrize("url, path, revision", [
    ("hf://o/r@refs/pr/1/a.pt", "a.pt", "refs/pr/1"),
    ("hf://o/r/a.pt@refs/convert/parquet", "a.pt", "refs/convert/parquet"),
    ("hf://o/r/vae/@v1.0", "vae", "v1.0"),
    ("hf://o/r@" + COMMIT, "", COMMIT),
])
def test_hub_paths_parse_with_special_refs_and_a_folder_slash(url, path, revision):
    assert (parse(url).path, parse(url).revision) == (path, revision)


@pytest.mark.parametrize("url, reason", [
    # paths out of the repository: a folder huggingface_hub would have fetched as a local one, a
    # file it refuses
    ("hf://o/r/../../../../tmp/x/enc",
     "the path '../../../../tmp/x/enc' has an empty, '.' or '..' part"),
    ("hf://o/r/..", "the path '..' has an empty, '.' or '..' part"),
    ("hf://o/r/a/../../x.pt", "the path 'a/../../x.pt' has an empty, '.' or '..' part"),
    ("hf://o/r/./x.pt", "the path './x.pt' has an empty, '.' or '..' part"),
    ("hf://o/r//etc/passwd", "the path '/etc/passwd' has an empty, '.' or '..' part"),
    ("hf://o/r/a//b.pt", "the path 'a//b.pt' has an empty, '.' or '..' part"),
    ("hf://o/r/a\\b.pt", "a backslash; parts are separated by /"),
    # revisions: one, last or right after the repository, not empty, no '/' but refs/pr/N and
    # refs/convert/NAME
    ("hf://o/r/x@y/z.pt",
     "revision 'y/z.pt' is not a branch, tag or commit hash, nor refs/pr/N or refs/convert/NAME"),
    ("hf://o/r/x.pt@", "an empty revision after @"),
    ("hf://o/r@/x.pt", "an empty revision after @"),
    ("hf://o/r@", "an empty revision after @"),
    ("hf://o/r@v1/x.pt@v2", "two revisions; give one"),
    ("hf://o/r/x.pt@..",
     "revision '..' is not a branch, tag or commit hash, nor refs/pr/N or refs/convert/NAME"),
    ("hf://o/r@refs/x/a.pt",
     "revision 'refs' is not a branch, tag or commit hash, nor refs/pr/N or refs/convert/NAME"),
])
def test_a_malformed_hub_path_is_one_line_naming_what_and_the_url(hub, url, reason):
    with pytest.raises(RegditError) as error:
        resolve_path(url, "VAE folder")
    assert str(error.value) == f"VAE folder {url} is not a Hub path ({reason}): write hf://OWNER/REPO/PATH[@REVISION]"


def test_a_cached_path_that_leads_out_of_its_repository_is_refused(hub, tmp_path):
    outside = tmp_path / "outside"
    (outside / "vae").mkdir(parents=True)
    (outside / "vae" / "config.json").write_text("{}")
    (outside / "x.pt").write_bytes(b"not from the Hub")
    hub("regdit-test/links", "plain.pt", OFFICIAL)
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--regdit-test--links"
    snapshot = repo / "snapshots" / COMMIT
    # huggingface_hub's layout: a snapshot's files are relative links into the repository's blobs/
    (repo / "blobs").mkdir()
    shutil.copyfile(OFFICIAL, repo / "blobs" / "0123abcd")
    (snapshot / "linked").mkdir()
    (snapshot / "linked" / "ckpt.pt").symlink_to(Path("..", "..", "..", "blobs", "0123abcd"))
    assert (resolve_path("hf://regdit-test/links/linked/ckpt.pt", "checkpoint").resolve()
            == repo / "blobs" / "0123abcd")
    assert resolve_path("hf://regdit-test/links/linked", "VAE folder") == snapshot / "linked"
    # links that lead out: a file, a folder, a file in a folder
    (snapshot / "x.pt").symlink_to(outside / "x.pt")
    (snapshot / "vae").symlink_to(outside / "vae")
    (snapshot / "enc").mkdir()
    (snapshot / "enc" / "model.safetensors").symlink_to(outside / "x.pt")
    for path, what, entry, target in (("x.pt", "checkpoint", "x.pt", "x.pt"),
                                      ("vae", "VAE folder", "vae", "vae"),
                                      ("enc", "encoder weights", "enc/model.safetensors", "x.pt")):
        url = f"hf://regdit-test/links/{path}"
        with pytest.raises(RegditError) as error:
            resolve_path(url, what)
        assert str(error.value) == (f"{what} {url}: {snapshot / entry} in the Hugging Face cache "
                                    f"leads to {outside / target}, outside the cache folder of "
                                    f"regdit-test/links ({repo}); delete that folder and fetch the "
                                    "path again")


def test_checkpoints_and_exports_from_the_hub_cache(hub, tmp_path):
    official = load_checkpoint(OFFICIAL)
    url = hub("regdit-test/tiny", "checkpoints/0000001.pt", OFFICIAL)
    # the layout is the one huggingface_hub itself finds offline
    found = huggingface_hub.hf_hub_download("regdit-test/tiny", "checkpoints/0000001.pt",
                                            local_files_only=True)
    assert found.endswith(f"snapshots/{COMMIT}/checkpoints/0000001.pt")
    loaded = load_checkpoint(url)
    assert loaded["steps"] == 1 and all(torch.equal(v, official["ema"][k])
                                        for k, v in loaded["ema"].items())

    # an hf:// checkpoint exported
    export(ExportConfig(ckpt=url, output=str(tmp_path / "export"), num_heads=4))
    hub("regdit-test/tiny", "export", tmp_path / "export")
    hub("regdit-test/root", "", tmp_path / "export")
    expected = from_pretrained(tmp_path / "export").state_dict()
    for source in ("hf://regdit-test/tiny/export/model.safetensors", "hf://regdit-test/tiny/export",
                   "regdit-test/root", "hf://regdit-test/root"):
        model = from_pretrained(source)  # the export's config.json comes with its weights
        assert not model.training and all(torch.equal(v, expected[k])
                                          for k, v in model.state_dict().items())

    # a revision: another commit under refs/v1, in both spellings
    hub("regdit-test/tiny", "checkpoints/0000001.pt", tmp_path / "export" / "model.safetensors",
        revision="v1", commit=COMMIT_V1)
    for revised in ("hf://regdit-test/tiny/checkpoints/0000001.pt@v1",
                    "hf://regdit-test/tiny@v1/checkpoints/0000001.pt"):
        assert COMMIT_V1 in str(resolve_path(revised, "checkpoint"))


def test_vae_encoder_and_sampling_from_hub_paths(hub, tmp_path, monkeypatch):
    tiny_vae().save_pretrained(tmp_path / "vae")
    save_random_encoder("dinov2-vit-b", tmp_path / "encoder", patch_size=7)
    vae_url = hub("regdit-test/parts", "vae", tmp_path / "vae")
    encoder_url = hub("regdit-test/parts", "encoder", tmp_path / "encoder")
    vae, reference = load_vae(vae_url), load_vae(str(tmp_path / "vae"))
    assert all(torch.equal(a, b)
               for a, b in zip(vae.state_dict().values(), reference.state_dict().values()))
    encoder, = load_encoders("dinov2-vit-b", 32, enc_path=encoder_url)
    local, = load_encoders("dinov2-vit-b", 32, enc_path=str(tmp_path / "encoder"))
    assert all(torch.equal(a, b)
               for a, b in zip(encoder.state_dict().values(), local.state_dict().values()))

    # the one-command path: an exported model and its VAE, both from the Hub
    cli_main(["export", str(OFFICIAL), "--output", str(tmp_path / "export"), "--num-heads", "4"])
    ckpt = hub("regdit-test/parts", "export", tmp_path / "export") + "/model.safetensors"
    monkeypatch.chdir(tmp_path)
    cli_main(["sample", "--ckpt", ckpt, "--vae", vae_url, "--num-fid-samples", "2", "--mode", "ode",
              "--num-steps", "2", "--sample-dir", "out"])
    npz, = (tmp_path / "out").glob("*.npz")
    assert (npz.name.startswith("SiT-custom-2-model-size-64-vae-vae-")
            and np.load(npz)["arr_0"].shape == (2, 64, 64, 3))


def test_eval_reads_reference_samples_and_inception_weights_from_the_hub(hub, tmp_path, capsys):
    save_random_inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    weights = hub("regdit-test/inception", "inception.pth", tmp_path / "inception.pth")
    ref = hub("regdit-test/refs", "ref.npz", tmp_path / "ref.npz", kind="datasets")
    samples = hub("regdit-test/refs", "run/samples.npz", tmp_path / "samples.npz", kind="datasets")
    assert inception_weights_path(weights).endswith(f"{COMMIT}/inception.pth")
    assert isinstance(load_inception(weights, "cpu"), torch.nn.Module)
    # both batches are read from the cache (their sizes compared) before any Inception forward
    message = cli_error(capsys, ["eval", "--ref_batch", ref, "--sample_batch", samples,
                                 "--inception-weights", weights,
                                 "--output", str(tmp_path / "m.json")])
    assert re.search(rf"the reference .*datasets--regdit-test--refs/snapshots/{COMMIT}/ref.npz "
                     rf"is 32x32 px but the samples .*/snapshots/{COMMIT}/run/samples.npz "
                     rf"are 16x16 px", message)
    # the metrics of hf:// samples are written to the current folder, not into the Hub cache
    assert output_path(EvalConfig(ref_batch=ref, sample_batch=samples)) == "samples.metrics.json"


def test_training_evaluation_reads_its_reference_from_the_hub(hub, tmp_path):
    from accelerate import PartialState

    from regdit.commands.monitor import TrainingEvaluation
    weights = hub("regdit-test/inception", "inception.pth",
                  save_random_inception_weights(tmp_path / "inception.pth"))
    config = SimpleNamespace(ref_batch="hf://o/r/ref.npz", eval_every=1, inception_weights=weights)
    with pytest.raises(RegditError, match=r"reference batch hf://o/r/ref.npz is not in the Hugging "
                                          r"Face cache .*`hf download o/r ref.npz`"):
        TrainingEvaluation(config, None, PartialState(), None)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--ckpt", "hf://regdit-test/tiny/missing.pt"],
     r"checkpoint hf://regdit-test/tiny/missing.pt is not in the Hugging Face cache "
     r"\(.*hf-cache\) and HF_HUB_OFFLINE=1 is set: fetch it once with "
     r"`hf download regdit-test/tiny missing.pt` on a machine"),
    (["sample", "--ckpt", "hf://regdit-test/tiny/export/model.safetensors@v2"],
     r"`hf download regdit-test/tiny export/model.safetensors --revision v2`"),
    (["sample", "--ckpt", "hf://regdit-test/tiny/ckpt.pt", "--vae", "hf://regdit-test/tiny/novae"],
     r"VAE folder hf://regdit-test/tiny/novae is not in the Hugging Face cache .*"
     r"`hf download regdit-test/tiny --include 'novae/\*'`"),
    (["eval", "--ref_batch", "hf://datasets/o/r/ref.npz", "--sample_batch", "s.npz",
      "--output", "m.json"],
     r"reference batch hf://datasets/o/r/ref.npz is not "
     r".*`hf download o/r ref.npz --repo-type dataset`"),
    (["sample", "--ckpt", "hf://o--o/r/x.pt"],
     r"hf://o--o/r/x.pt is not a Hub path \(.*\): write hf://OWNER/REPO"),
    (["sample", "--ckpt", "hf://regdit-test/tiny/ckpt.pt", "--vae", "hf://o/r/.."],
     r"^regdit sample: error: VAE folder hf://o/r/\.\. is not a Hub path \(the path '\.\.' has "
     r"an empty, '\.' or '\.\.' part\): write hf://OWNER/REPO/PATH\[@REVISION\]$"),
    (["sample", "--ckpt", "hf://regdit-test/tiny/../tiny/ckpt.pt"],
     r"checkpoint hf://regdit-test/tiny/\.\./tiny/ckpt.pt is not a Hub path \(the path '\.\./"),
    (["sample", "--ckpt", "hf://regdit-test/tiny/x@y/ckpt.pt"],
     r"checkpoint .* \(revision 'y/ckpt.pt' is not a "),
    (["sample", "--ckpt", "hf://regdit-test/tiny/ckpt.pt@"],
     r"checkpoint .* \(an empty revision after @\)"),
])
def test_a_path_missing_offline_is_one_line_naming_the_download(hub, tmp_path, monkeypatch, capsys,
                                                                argv, message):
    hub("regdit-test/tiny", "ckpt.pt", OFFICIAL)
    monkeypatch.chdir(tmp_path)
    assert re.search(message, cli_error(capsys, argv))


def test_missing_encoder_weights_offline_name_the_download(hub):
    with pytest.raises(RegditError, match=r"encoder weights hf://o/r/enc is not in the Hugging "
                                          r"Face cache .*`hf download o/r --include 'enc/\*'`"):
        load_encoders("dinov2-vit-b", 32, enc_path="hf://o/r/enc")
    with pytest.raises(RegditError, match=r"^encoder weights hf://o/r/\.\./\.\./\.\./\.\./tmp/x/"
                                          r"enc is not a Hub path"):
        load_encoders("dinov2-vit-b", 32, enc_path="hf://o/r/../../../../tmp/x/enc")


def test_from_pretrained_of_save_pretrained_round_trips_exactly(tmp_path):
    config = SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                       num_heads=2, num_classes=10, z_dims=(16,), projector_dim=32, encoder_depth=1)
    model = SiT(config)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer left: every tensor is checked
            p.add_(torch.randn_like(p))
    path = save_pretrained(model, tmp_path / "m",
                           latents={"vae": "ema", "scale": 0.18215, "resolution": 64},
                           path_type="linear")
    assert (sorted(p.name for p in (tmp_path / "m").iterdir())
            == ["config.json", "model.safetensors"])
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.config == config and loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) and v.dtype == loaded.state_dict()[k].dtype
               for k, v in model.state_dict().items())
    assert load_checkpoint(path)["latents"]["vae"] == "ema"  # the export format, checksum verified
    # one writer: save_pretrained of an export's model writes what `regdit export` wrote
    cli_main(["export", str(OFFICIAL), "--output", str(tmp_path / "export"), "--num-heads", "4"])
    save_pretrained(from_pretrained(tmp_path / "export"), tmp_path / "again", path_type="linear")
    assert ((tmp_path / "again" / "config.json").read_bytes()
            == (tmp_path / "export" / "config.json").read_bytes())
    written = []
    # the header's metadata order varies between calls: compare contents
    for folder in ("export", "again"):
        with safe_open(tmp_path / folder / "model.safetensors", "pt") as f:
            written.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
    assert written[0][0] == written[1][0] and written[0][1].keys() == written[1][1].keys()
    assert all(torch.equal(v, written[1][1][k]) for k, v in written[0][1].items())


@pytest.fixture
def local_hub(monkeypatch):
    with local_hub_online(monkeypatch) as hub:
        yield hub


@pytest.fixture
def exp(tmp_path):
    """A run folder holding the official tiny checkpoint at step 1 and its preview grid."""
    (tmp_path / "exp" / "checkpoints").mkdir(parents=True)
    (tmp_path / "exp" / "samples").mkdir()
    shutil.copyfile(OFFICIAL, tmp_path / "exp" / "checkpoints" / "0000001.pt")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "exp" / "samples" / "0000001.png")
    settings = {"num_samples": 50000, "ref_batch": "/data/VIRTUAL_imagenet256_labeled.npz"}
    metrics = {"inception_score": 299.4, "fid": 1.36, "sfid": 4.25, "precision": 0.77,
               "recall": 0.66, "settings": settings}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_push_to_hub_uploads_the_export_with_a_model_card(exp, local_hub):
    out = exp / "export"
    cli_main(["export", str(exp / "exp" / "checkpoints" / "0000001.pt"), "--output", str(out),
              "--num-heads", "4", "--push-to-hub", "me/reg-tiny", "--private",
              "--metrics", str(exp / "metrics.json")])
    created = [json.loads(body) for _, path, _, body in local_hub.requests
               if path == "/api/repos/create"]
    assert created == [{"name": "reg-tiny", "organization": "me", "visibility": "private"}]
    commit, = [body for _, path, _, body in local_hub.requests if path.endswith("/commit/main")]
    assert "0000001.pt" in json.loads(commit.splitlines()[0])["value"]["summary"]
    files = local_hub.committed()
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    # the run's grid
    assert files["samples.png"] == (exp / "exp" / "samples" / "0000001.png").read_bytes()
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert (front["library_name"] == "regdit" and front["license"] == "mit"
            and "regdit" in front["tags"])
    # the Hub's own parser reads it
    assert huggingface_hub.ModelCard(card).data.library_name == "regdit"
    for line in ("![samples](samples.png)", "| model | SiT/2, depth 4, width 64 (",
                 "| training steps | 1 |",
                 "| method | REG (entangled class token + REPA alignment) |",
                 "| encoder_depth | 2 |", "| FID | 1.3600 |", "| Recall | 0.6600 |",
                 "50000 samples against `VIRTUAL_imagenet256_labeled.npz`",
                 "regdit sample --ckpt hf://me/reg-tiny/model.safetensors",
                 'from_pretrained("me/reg-tiny")'):
        assert line in card, line


@pytest.mark.parametrize("extra, message", [
    (["--private"], r"--private applies to the repository --push-to-hub creates"),
    (["--push-to-hub", "a/b/c"], r"--push-to-hub a/b/c: not a Hub repository id"),
    (["--push-to-hub", "me/x", "--metrics", "{exp}/missing.json"],
     r"--metrics .*missing.json is unreadable"),
    (["--push-to-hub", "me/x", "--metrics", "{exp}/exp/samples/0000001.png"],
     r"is unreadable \(UnicodeDecodeError"),
    (["--metrics", "{exp}/exp/checkpoints/../../bad.json"], r"is not a `regdit eval` metrics JSON"),
    (["--grid", "{exp}/nothing.png"], r"--grid .*nothing.png does not exist"),
    (["--push-to-hub", "me/x"],
     r"cannot push .* to me/x \(HfHubHTTPError: .*401 Unauthorized.*\): log in .*; the export is "
     r"complete, and the same command pushes it again$"),
    (["--push-to-hub", "me/x", "OFFLINE"],
     r"--push-to-hub me/x needs the network but HF_HUB_OFFLINE=1 is set"),
])
def test_export_refusals_are_one_line(exp, monkeypatch, capsys, local_hub, extra, message):
    local_hub.refuse = True
    (exp / "bad.json").write_text('{"fid": "low"}')
    if "OFFLINE" in extra:
        extra.remove("OFFLINE")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = ["export", str(exp / "exp" / "checkpoints" / "0000001.pt"),
            "--output", str(exp / "export"), "--num-heads", "4",
            *(a.replace("{exp}", str(exp)) for a in extra)]
    assert re.search(message, cli_error(capsys, argv))


def test_readme_samples_the_published_checkpoint_in_one_command():
    section = re.search(r"## Published weights\n(.*?)\n## ", README.read_text(), re.S).group(1)
    command = re.search(r"```bash\n(regdit sample .*?)\n#", section, re.S).group(1)
    _, _, config = parse_config(shlex.split(command.replace("\\\n", " "))[1:])
    assert config.ckpt == "hf://Martinser/REG/4000000.pt" and parse(config.ckpt).is_file
    sampling = config.sampling
    assert ((sampling.sampler, sampling.num_steps, sampling.cfg_scale, sampling.cls_cfg_scale,
             sampling.guidance_low, sampling.guidance_high, config.num_fid_samples)
            == ("sde", None, 2.3, 2.3, 0.0, 0.85, 50000))
    assert "FID 1.36" in section


ODDITIES = {  # what is odd in the cache -> the one line, after "checkpoint hf://o/r/x.pt: "
    "refs-path": "the Hugging Face cache's {repo}/refs/main holds '../../../../tmp', not a commit "
                 "hash; delete it and fetch the path again",
    "refs-folder": "the Hugging Face cache's {repo}/refs/main is not a regular file: it is a "
                   "folder; replace it with a file or pass another path",
    "cache-dangling": "the Hugging Face cache folder {cache} is a link that leads nowhere; remove "
                      "it or set HF_HUB_CACHE to a folder",
    "cache-file": "the Hugging Face cache folder {cache} is a file; remove it or set HF_HUB_CACHE "
                  "to a folder",
    "repo-dangling": "the Hugging Face cache folder {repo} is a link that leads nowhere; remove it "
                     "or set HF_HUB_CACHE to a folder",
    "repo-file": "the Hugging Face cache folder {repo} is a file; remove it or set HF_HUB_CACHE to "
                 "a folder",
}


@pytest.mark.parametrize("oddity", ODDITIES)
@pytest.mark.parametrize("url", ["hf://o/r/x.pt", "hf://o/r/vae"])
def test_hub_cache_oddities_are_one_line_each(hub, tmp_path, oddity, url):
    hub("o/r", "x.pt", OFFICIAL)
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    repo = cache / "models--o--r"
    if oddity.startswith("refs-"):
        (repo / "refs" / "main").unlink()
        if oddity == "refs-path":
            (repo / "refs" / "main").write_text("../../../../tmp")
        else:
            (repo / "refs" / "main").mkdir()
    else:
        odd = cache if oddity.startswith("cache-") else repo
        shutil.rmtree(odd)
        if oddity.endswith("-file"):
            odd.write_text("not a folder")
        else:
            odd.symlink_to(tmp_path / "nowhere")
    with pytest.raises(RegditError) as error:
        resolve_path(url, "checkpoint")
    assert str(error.value) == f"checkpoint {url}: " + ODDITIES[oddity].format(cache=cache,
                                                                               repo=repo)


class Listing(http.server.BaseHTTPRequestHandler):
    """The Hub's listing of repository o/r at commit COMMIT, one of whose names climbs out of it."""

    def do_GET(self):
        listed = [{"type": "file", "path": "../../escape.pt", "size": 3, "oid": "c" * 40}]
        data = json.dumps(listed if "/tree/" in self.path else
                          {"id": "o/r", "sha": COMMIT,
                           "siblings": [{"rfilename": entry["path"]} for entry in listed]}).encode()
        self.send_response(200 if self.path.startswith("/api/models/o/r") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_listed_name_with_dots_is_one_line(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listing)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(RegditError) as error:
            resolve_path("hf://o/r", "VAE folder")
    finally:
        server.shutdown()
        server.server_close()
    assert str(error.value) == (
        "VAE folder hf://o/r: huggingface_hub refused a path of o/r (Invalid filename "
        "'../../escape.pt': cannot contain a '..' path segment. Please ask the repository owner "
        "to rename this file.): the repository lists a file "
        f"outside itself, or its cache folder {tmp_path / 'cache' / 'models--o--r'} is damaged "
        "(delete it and fetch the path again)")
    assert not list(tmp_path.rglob("escape.pt"))

"""What commands write: every output is a new path or the command's own earlier output (recognised
by its format), never one of its inputs, a folder, a FIFO or a device; a refusal is one line naming
the path and the fix, before anything changes. `export --push-to-hub` sends exactly the export's
files, checked against a local stand-in for the Hub's API that the real huggingface_hub client talks
to."""
import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.parse

import huggingface_hub
import numpy as np
import pytest
from PIL import Image
from test_bad_inputs import EVAL, SAMPLE, TRAIN, snapshot
from test_bad_inputs import world as bad_inputs_world  # noqa: F401 (its fixture, built again here)

from regdit import RegditError
from regdit.commands.cli import main
from regdit.commands.export import EXPORT_FILES, push_folder
from regdit.files import check_output

CKPT = "{W}/exps/run/checkpoints/0000001.pt"
REPORT = ["report", "{W}/exps/run"]
EXPORT = ["export", CKPT]
OFFLINE = "HF_HUB_OFFLINE=1"  # a case that starts with it runs with huggingface_hub offline

CASES = [  # (arguments, the one line must match)
    # eval --output: never an input, however spelled; never a folder, FIFO, device or someone else's
    # file
    (EVAL + ["--output", "{W}/samples32.npz"],
     r"cannot write \S+/samples32.npz: it is the --sample-batch \S+, which this command reads; "
     r"pass another --output$"),
    (EVAL + ["--output", "{W}/ref32.npz"], r"cannot write \S+/ref32.npz: it is the --ref-batch "),
    (EVAL + ["--output", "{W}/inception.pth"],
     r"cannot write \S+/inception.pth: it is the Inception weights "),
    (EVAL + ["--output", "{W}/link-to-samples.npz"],
     r"link-to-samples.npz: it is the --sample-batch \S+/samples32"),
    (EVAL + ["--output", "{W}/exps/../samples32.npz"], r"it is the --sample-batch "),
    (EVAL + ["--output", "{W}/notes.json"],
     r"notes.json: it is not a metrics JSON of `regdit eval` .*; move it away "
     r"or pass another --output$"),
    (EVAL + ["--output", "{W}/pipe.json"], r"pipe.json: it is a FIFO \(named pipe\), not a file"),
    (EVAL + ["--output", "/dev/null"], r"/dev/null: it is a character device, not a file"),
    (EVAL + ["--output", "{W}/exps"], r"exps: it is a folder, not a file"),
    (["eval", "--make-ref", "{W}/samples32.npz", "--output", "{W}/samples32.npz"],
     r"it is the --make-ref "),
    (["eval", "--make-ref", "{W}/images", "--output", "{W}/samples32.npz"],
     r"samples32.npz: it is not a reference .npz of `regdit eval --make-ref` "
     r"\(arr_0, mu, sigma, mu_s, sigma_s\)"),
    # report: its output, and the runs it reads
    (REPORT + ["--output", "{W}/dir.png"], r"dir.png: it is a folder, not a file"),
    (REPORT + ["--output", "{W}/pipe.png"], r"pipe.png: it is a FIFO \(named pipe\), not a file"),
    (REPORT + ["--output", "{W}/photo.png"], r"photo.png: it is not a figure of `regdit report`"),
    (REPORT + ["--output", "{W}/notes.html"], r"notes.html: it is not a page of `regdit report`"),
    (["report", "{W}/exps/metrics-folder", "--output", "{W}/new.png"],
     r"metrics.jsonl is a folder, not the file"),
    (["report", "{W}/exps/metrics-fifo", "--output", "{W}/new.png"],
     r"metrics.jsonl is a FIFO \(named pipe\), not"),
    (["report", "{W}/exps/no-step", "--output", "{W}/new.png"],
     r"no-step/metrics.jsonl: line 2 has no step"),
    (["report", "{W}/exps/settings-list", "--output", "{W}/new.png"],
     r"config.yaml is not the settings file"),
    # export: a folder that is new, empty or an earlier export; inputs and grids checked before any
    # work
    (EXPORT + ["--output", "{W}/afile"],
     r"afile: it is a file, not a folder; move it away or pass another --output$"),
    (EXPORT + ["--output", "{W}/secrets"],
     r"secrets: it holds .env, id_rsa, which an export does not"),
    (EXPORT + ["--output", "{W}/project"],
     r"project/config.json: it is not the settings of an export"),
    (EXPORT + ["--output", "{W}/card-only"],
     r"card-only/README.md: it is not the model card of an export"),
    (EXPORT + ["--output", "{W}/export", "--grid", "{W}/export/model.safetensors"],
     r"export/model.safetensors: it is the --grid \S+, which this command reads"),
    (["export", "{W}/export/model.safetensors", "--output", "{W}/export"],
     r"it is the checkpoint "),
    (EXPORT + ["--output", "{W}/new-export", "--grid", "/etc/hostname"],
     r"--grid /etc/hostname is not a readable image \(UnidentifiedImageError"),
    (EXPORT + ["--output", "{W}/new-export", "--grid", "{W}/pipe.png"],
     r"--grid \S+ is a FIFO \(named pipe\), not"),
    (EXPORT + ["--output", "{W}/new-export", "--grid", "{W}/cut.png"],
     r"--grid \S+cut.png is not a readable image"),
    (EXPORT + ["--output", "{W}/new-export", "--metrics", "{W}/pipe.json"],
     r"--metrics \S+ is a FIFO"),
    (EXPORT + ["--output", "{W}/new-export", "--push-to-hub", ""],
     r"--push-to-hub '' names no repository"),
    ([OFFLINE] + EXPORT + ["--output", "{W}/new-export", "--push-to-hub", "me/x"],
     r"--push-to-hub me/x needs the network but HF_HUB_OFFLINE=1 is set"),
    # train: the files of the experiment folder
    (TRAIN + ["--exp-name", "metrics-folder"],
     r"metrics.jsonl: it is a folder, not a file; move it away or pass "
     r"another --output-dir/--exp-name$"),
    (TRAIN + ["--exp-name", "metrics-fifo"],
     r"metrics-fifo/metrics.jsonl: it is a FIFO \(named pipe\), not a file"),
    (TRAIN + ["--exp-name", "metrics-foreign"],
     r"metrics.jsonl: it is not the metrics log of a `regdit train` run"),
    (TRAIN + ["--exp-name", "checkpoints-file"], r"checkpoints: it is a file, not a folder"),
    (TRAIN + ["--exp-name", "settings-folder"], r"config.yaml: it is a folder, not a file"),
    (TRAIN + ["--exp-name", "settings-list"],
     r"config.yaml: it is not the settings file of a `regdit train` run"),
    (TRAIN + ["--exp-name", "lock-folder"],
     r"lock-folder/.regdit.lock: it is a folder, not a file; move it away$"),
    (TRAIN + ["--exp-name", "lock-fifo"],
     r"lock-fifo/.regdit.lock: it is a FIFO \(named pipe\), not a file"),
    # sample: the run folder and its .npz
    (SAMPLE + ["--sample-dir", "{W}/run-is-a-file"],
     r"sde-2: it is a file, not a folder; move it away or pass another --sample-dir$"),
    (SAMPLE + ["--sample-dir", "{W}/npz-is-a-folder"], r"sde-2.npz: it is a folder, not a file"),
    (SAMPLE + ["--sample-dir", "{W}/npz-is-foreign"],
     r"sde-2.npz: it is not a samples .npz of `regdit sample`"),
]


@pytest.fixture(scope="module")
def taken(request):
    """test_bad_inputs' world with outputs taken by what no command may write over: folders, FIFOs
    and files of others where outputs go, runs whose files are taken (a FIFO as metrics log once
    hung a resume), an export folder with secrets."""
    world = request.getfixturevalue("bad_inputs_world")
    exps = world / "exps"
    for name, path in [("metrics-folder", "metrics.jsonl"), ("settings-folder", "config.yaml"),
                       ("lock-folder", ".regdit.lock")]:
        (exps / name / path).mkdir(parents=True)
    for name in ("metrics-fifo", "lock-fifo", "metrics-foreign", "checkpoints-file",
                 "settings-list", "no-step"):
        # a run to resume, so that only the taken path is wrong
        shutil.copytree(exps / "run", exps / name)
    os.mkfifo(exps / "metrics-fifo" / "metrics.jsonl.fifo")
    os.replace(exps / "metrics-fifo" / "metrics.jsonl.fifo",
               exps / "metrics-fifo" / "metrics.jsonl")
    os.mkfifo(exps / "lock-fifo" / ".regdit.lock")
    (exps / "metrics-foreign" / "metrics.jsonl").write_text("my notes\n")
    shutil.rmtree(exps / "checkpoints-file" / "checkpoints")
    (exps / "checkpoints-file" / "checkpoints").write_text("not a folder\n")
    (exps / "settings-list" / "config.yaml").write_text("- a list\n")
    (exps / "no-step" / "metrics.jsonl").write_text('{"step": 1, "loss_final": 1.0}\n'
                                                     '{"loss_final": 2.0}\n')

    shutil.copytree(world / "export", world / "secrets")
    (world / "secrets" / ".env").write_text("HF_TOKEN=hf_secret\n")
    (world / "secrets" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (world / "project").mkdir()
    (world / "project" / "README.md").write_text("# my project\n")
    (world / "project" / "config.json").write_text('{"name": "mine"}\n')
    (world / "card-only").mkdir()
    (world / "card-only" / "README.md").write_text("# my project\n")

    (world / "dir.png").mkdir()
    for name in ("pipe.png", "pipe.json"):
        os.mkfifo(world / name)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(world / "photo.png")
    (world / "cut.png").write_bytes((world / "photo.png").read_bytes()[:40])
    (world / "notes.json").write_text('{"my": "notes"}\n')
    (world / "notes.html").write_text("<html>my page</html>\n")
    (world / "link-to-samples.npz").symlink_to(world / "samples32.npz")

    main([a.replace("{W}", str(world)) for a in SAMPLE + ["--sample-dir", "{W}/sampled"]])
    npz = next((world / "sampled").glob("*.npz"))
    for name in ("run-is-a-file", "npz-is-a-folder", "npz-is-foreign"):
        (world / name).mkdir()
    (world / "run-is-a-file" / npz.stem).write_text("not a folder\n")
    (world / "npz-is-a-folder" / npz.name).mkdir()
    np.savez(world / "npz-is-foreign" / npz.name, mine=np.zeros(3))
    return world


@contextlib.contextmanager
def deadline(seconds):
    """Fail with TimeoutError after `seconds`, also out of a blocking system call (an open of a
    FIFO)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("argv,expected", CASES,
                         ids=[" ".join(a[:2]) + " " + " ".join(a[-2:]) for a, _ in CASES])
def test_an_output_that_is_not_the_commands_is_one_line_and_changes_nothing(taken, argv, expected,
                                                                            capsys, monkeypatch):
    if argv[0] == OFFLINE:
        argv = argv[1:]
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = [a.replace("{W}", str(taken)) for a in argv]
    before = snapshot(taken)
    capsys.readouterr()
    started = time.perf_counter()
    # a FIFO opened for reading or writing would block
    with deadline(20), pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - started
    code, err = exit_info.value.code, capsys.readouterr().err
    assert isinstance(code, str) and "\n" not in code and "Traceback" not in err, (code, err)
    assert code.startswith(f"regdit {argv[0]}: error: "), code
    assert re.search(expected, code), code
    assert snapshot(taken) == before
    assert elapsed < 20, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_outputs_of_the_command_itself_are_written_again(taken, tmp_path, capsys):
    """An earlier export, report or samples .npz is recognised and replaced; the inputs stay as they
    were."""
    inputs = {path: path.read_bytes()
              for path in (taken / "exps" / "run" / "metrics.jsonl", taken / "photo.png")}
    for _ in range(2):
        main(["export", str(taken / "exps" / "run" / "checkpoints" / "0000001.pt"),
              "--output", str(tmp_path / "ex"), "--grid", str(taken / "photo.png")])
        for name in ("report.png", "report.html"):
            main(["report", str(taken / "exps" / "run"),
                  "--output", str(tmp_path / "figures" / name)])
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) \
        == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert (tmp_path / "ex" / "samples.png").read_bytes() == inputs[taken / "photo.png"]
    assert all(path.read_bytes() == content for path, content in inputs.items())
    sampled = [a.replace("{W}", str(taken)) for a in SAMPLE + ["--sample-dir", "{W}/sampled"]]
    npz = next((taken / "sampled").glob("*.npz"))
    # cut short: an .npz the command can no longer recognise is left to the user
    npz.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"sde-2.npz: it is not a samples .npz of `regdit sample`"):
        main(sampled)
    npz.unlink()
    main(sampled)
    main(sampled)  # its own .npz, packed again
    assert np.load(npz)["arr_0"].shape == (4, 32, 32, 3)


def test_a_report_leaves_out_non_finite_points(taken, tmp_path):
    """NaN and Infinity, which Python's json reads, and entries without a loss term give gaps, not a
    KeyError."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss_final": float("nan"), "loss_mean": 1.0},
             {"step": 2, "loss_final": float("inf")},
             {"step": 3, "loss_final": 0.5, "images_per_sec": float("-inf")},
             {"step": 3, "eval/fid": float("nan")},
             {"step": 4, "eval/fid": 20.0, "eval/inception_score": float("inf")}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert "NaN" in (run / "metrics.jsonl").read_text()
    from regdit.extras.report import read_run, series, summary_rows
    _, _, training, evaluations = read_run(run)
    assert series(training, "loss_final") == ([3.0], [0.5]) \
        and series(training, "loss_mean") == ([1.0], [1.0])
    assert series(evaluations, "eval/fid") == ([4.0], [20.0]) \
        and series(evaluations, "eval/inception_score") == ([], [])
    assert summary_rows([("run", {}, training, evaluations)], ["run"])["best FID"] \
        == ["20.000 at step 4"]
    main(["report", str(run), "--output", str(tmp_path / "report.png")])
    assert Image.open(tmp_path / "report.png").size == (1600, 900)


def test_check_output_compares_inputs_as_files(tmp_path):
    source = tmp_path / "in.npz"
    source.write_bytes(b"x")
    os.link(source, tmp_path / "hard.npz")
    (tmp_path / "sub").mkdir()
    for spelling in (tmp_path / "hard.npz", tmp_path / "sub" / ".." / "in.npz",
                     os.path.relpath(source)):
        with pytest.raises(RegditError, match=r"it is the --x \S+in.npz, which this command reads; "
                                              r"pass another --y"):
            check_output(spelling, "--y", inputs={"--x": str(source)})
    check_output(tmp_path / "new.npz", "--y", inputs={"--x": str(source)})  # new: taken


# ---- the Hub -------------------------------------------------------------------------------------


class LocalHub(http.server.ThreadingHTTPServer):
    """The Hub's API on 127.0.0.1, as far as huggingface_hub's `create_repo` and `create_commit` use
    it: create a repository, validate a model card's YAML, preupload (every file "regular", so sent
    inside the commit) and commit (NDJSON). Records every request; `refuse` answers each with 401,
    like the Hub for a bad token."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubRequest)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests, self.refuse = [], False

    def committed(self):
        """{path: bytes} of every file in the commits received."""
        files = {}
        for method, path, _, body in self.requests:
            if method == "POST" and "/commit/" in path:
                for item in map(json.loads, body.splitlines()):
                    # no LFS, no deletion
                    assert item["key"] == "header" or item["key"] == "file", item
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return files


class HubRequest(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = urllib.parse.urlsplit(self.path).path
        self.server.requests.append(("POST", path, self.headers.get("Authorization"), body))
        if self.server.refuse:
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            url = f"{self.server.endpoint}/{payload['organization']}/{payload['name']}"
            return self.reply(200, {"url": url})
        if path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/main", path):
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.reply(200, {"files": files})
        commit = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path)
        if commit:
            url = f"{self.server.endpoint}/{commit[1]}/commit/{'c' * 40}"
            return self.reply(200, {"commitUrl": url, "commitOid": "c" * 40,
                                    "pullRequestUrl": None})
        return self.reply(404, {"error": f"no {path} here"})

    def do_GET(self):
        self.server.requests.append(("GET", self.path, self.headers.get("Authorization"), b""))
        self.reply(401 if self.server.refuse else 404, {"error": "not served"})

    def reply(self, status, content):
        data = json.dumps(content).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def local_hub_online(monkeypatch):
    """huggingface_hub online, its endpoint a LocalHub, a test token; any connection elsewhere
    fails."""
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) \
                and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network is off in tests ({address})")
        return real_connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    hub = LocalHub()
    # polled every 50 ms rather than 0.5 s: shutdown() waits for a poll
    threading.Thread(target=hub.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()


@pytest.fixture
def local_hub(monkeypatch):
    with local_hub_online(monkeypatch) as hub:
        yield hub


def test_push_sends_exactly_the_export(taken, tmp_path, local_hub):
    out, grid = tmp_path / "export", tmp_path / "grid.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(grid)
    main(["export", str(taken / "exps" / "run" / "checkpoints" / "0000001.pt"),
          "--output", str(out), "--grid", str(grid), "--push-to-hub", "me/reg-tiny", "--private"])
    committed = local_hub.committed()
    assert sorted(committed) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert all(content == (out / name).read_bytes() for name, content in committed.items())
    created = [json.loads(body) for _, path, _, body in local_hub.requests
               if path == "/api/repos/create"]
    assert created == [{"name": "reg-tiny", "organization": "me", "visibility": "private"}]
    assert {authorization for method, _, authorization, _ in local_hub.requests
            if method == "POST"} == {"Bearer hf_local_test_token"}


def test_push_folder_sends_nothing_else_in_the_folder(taken, tmp_path, local_hub):
    """A key or an .env that lands in the folder after the export is written stays on this
    machine."""
    folder = tmp_path / "export"
    shutil.copytree(taken / "export", folder)
    Image.new("RGB", (8, 8)).save(folder / "samples.png")
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    files = [*EXPORT_FILES, "samples.png"]
    url = push_folder(folder, files, "me/reg-tiny", False, "an export")
    assert url == f"{local_hub.endpoint}/me/reg-tiny"
    assert local_hub.committed() == {name: (folder / name).read_bytes() for name in files}
    assert not any(b"hf_secret" in body or b"PRIVATE KEY" in body
                   for *_, body in local_hub.requests)


def test_a_refused_push_is_one_line_and_the_export_is_complete(taken, tmp_path, local_hub, capsys):
    local_hub.refuse = True
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(taken / "exps" / "run" / "checkpoints" / "0000001.pt"),
              "--output", str(tmp_path / "ex"), "--push-to-hub", "me/x"])
    assert re.fullmatch(r"regdit export: error: cannot push \S+ex to me/x "
                        r"\(HfHubHTTPError: .*401 Unauthorized.*\): log in with write access .*; "
                        r"the export is complete, and the same command pushes it again",
                        exit_info.value.code), exit_info.value.code
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) \
        == ["README.md", "config.json", "model.safetensors"]

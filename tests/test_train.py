"""End to end: train.py and evaluate.py as a user runs them, on a tiny synthetic set, in subprocesses."""

import csv
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import data
from machinery import runs, synthetic
from machinery.cache import StageCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return result


def table_row(output, start):
    line = next(line for line in output.splitlines() if line.startswith(start))
    return [float(v) for v in re.findall(r"\d\.\d{3}", line.split(")")[-1] if ")" in line else line)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    root = synthetic.make_synthetic(str(tmp / "syn"), n_train=48, n_test=24, seed=3, workers=2, verbose=False)
    common = ["--data", root, "--out", str(tmp / "runs"), "--cache-dir", str(tmp / "cache"), "--epochs", "2",
              "--batch-size", "8", "--log-every", "2", "--res", "28"]
    first = run("train.py", *common)
    baseline = run("train.py", *common, "--no-kd")
    return tmp, first.stdout, baseline.stdout


def test_training_runs_teacher_then_student_and_prints_auroc(tiny):
    tmp, out, _ = tiny
    assert "teacher epoch 2/2" in out and "mlcak epoch 2/2" in out
    assert re.search(r"kd_attn [0-9.e-]+ .*img/s, ETA", out)
    assert len(table_row(out, "mean local AUROC")) == 2  # teacher@224 and mlcak@28


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_every_run_folder_has_a_log_of_one_row_per_epoch(tiny):
    tmp, out, _ = tiny
    mlcak = next(tmp / "runs" / d for d in os.listdir(tmp / "runs") if d.startswith("mlcak-28"))
    rows = log_rows(mlcak)
    total = int(re.search(r"mlcak: .*, (\d+) steps", out).group(1))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == [str(total // 2), str(total)]
    assert list(rows[0]) == ["epoch", "step", "lr", "cls_local", "cls_global", "kd_local", "kd_global", "kd_attn", "total",
                             "val_mean_local_auroc", "val_normal_abnormal_auroc", "seconds", "images_per_second"]
    val = re.findall(r"mlcak epoch \d: val mean local AUROC (\d\.\d{3})", out)
    assert [f"{float(r['val_mean_local_auroc']):.3f}" for r in rows] == val  # the scores the progress lines printed
    assert all(float(r["total"]) > 0 and float(r["lr"]) > 0 and float(r["images_per_second"]) > 0 for r in rows)
    teacher = next(tmp / "runs" / d for d in os.listdir(tmp / "runs") if d.startswith("teacher"))
    assert "kd_attn" not in log_rows(teacher)[0] and len(log_rows(teacher)) == 2


def test_checkpoints_load_with_weights_only_and_hold_plain_values(tiny):
    tmp, _, _ = tiny
    paths = [os.path.join(d, f) for d, _, fs in os.walk(tmp / "runs") for f in fs if f.endswith(".pt")]
    assert len(paths) == 6  # best and last for teacher, mlcak, baseline
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["role"] in ("teacher", "mlcak", "baseline") and isinstance(ckpt["vit_config"], dict)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_second_run_reuses_the_teacher_and_shows_the_baseline(tiny):
    _, _, out = tiny
    assert "teacher epoch" not in out and "baseline epoch 2/2" in out
    assert len(table_row(out, "mean local AUROC")) == 3  # teacher, baseline, mlcak


def test_evaluate_reproduces_the_auroc_that_training_printed(tiny):
    tmp, _, out = tiny
    runs = sorted(os.listdir(tmp / "runs"))
    order = [next(r for r in runs if r.startswith(p)) for p in ("teacher", "baseline-28", "mlcak-28")]
    result = run("evaluate.py", *[str(tmp / "runs" / r / "best.pt") for r in order])
    for row in ("mean local AUROC", "normal/abnormal AUROC"):
        assert table_row(result.stdout, row) == table_row(out, row)
    assert os.path.isfile(tmp / "runs" / order[0] / "best.eval.json")


def test_evaluate_names_a_missing_checkpoint():
    result = run("evaluate.py", "/no/such/best.pt", check=False)
    assert result.returncode == 1 and "/no/such/best.pt: checkpoint not found" in result.stderr


def test_compare_writes_the_resolution_table_and_maps_reusing_finished_runs(tiny):
    tmp, _, _ = tiny
    out = run("train.py", "--data", str(tmp / "syn"), "--out", str(tmp / "runs"), "--cache-dir", str(tmp / "cache"),
              "--epochs", "2", "--batch-size", "8", "--res", "56", "28", "--compare", "--bootstrap", "200").stdout
    assert "teacher@224: reusing" in out and "baseline@28: reusing" in out and "mlcak@28: reusing" in out
    assert "baseline epoch 2/2" in out and "mlcak epoch 2/2" in out and "teacher epoch" not in out  # only the 56 students are new
    table = next(f for f in os.listdir(tmp / "runs") if f.startswith("table-") and f.endswith(".md"))
    text = open(tmp / "runs" / table).read()
    for row in ("| teacher@224 |", "| baseline@56 |", "| mlcak@56 |", "| baseline@28 |", "| mlcak@28 |",
                "| uniform map (chance) |"):
        assert row in text
    assert text.count("mlcak - baseline:") == 2
    maps = tmp / "runs" / table.replace(".md", "-maps")
    assert len(os.listdir(maps)) == 7  # six images and the overview


def test_evaluate_writes_attention_maps_for_chosen_images(tiny):
    tmp, _, _ = tiny
    teacher = next(r for r in os.listdir(tmp / "runs") if r.startswith("teacher"))
    ckpt = str(tmp / "runs" / teacher / "best.pt")
    ids = data.XrayDataset(torch.load(ckpt, weights_only=True)["data"]["test_cache"]).image_ids[:2]
    out = run("evaluate.py", ckpt, "--maps", str(tmp / "maps"), "--map-ids", ",".join(ids), "--bootstrap", "100").stdout
    assert "wrote 2 figures" in out and sorted(os.listdir(tmp / "maps")) == sorted([f"{i}.png" for i in ids] + ["overview.png"])
    bad = run("evaluate.py", ckpt, "--maps", str(tmp / "maps"), "--map-ids", "nope", check=False)
    assert bad.returncode == 1 and "--map-ids: image nope is not in the test set" in bad.stderr


def small_run(tmp, out, *extra, epochs=2, runner=None):
    cmd = (runner or [sys.executable]) + ["train.py", "--data", str(tmp / "syn"), "--out", str(tmp / out), "--cache-dir",
                                         str(tmp / "cache"), "--epochs", str(epochs), "--batch-size", "8", "--res", "28",
                                         "--bootstrap", "0", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def final_weights(folder, role):
    run_dir = next(d for d in os.listdir(folder) if d.startswith(role))
    return torch.load(os.path.join(folder, run_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]


def test_two_gloo_processes_agree_with_one_at_the_same_global_batch(tiny):
    tmp, _, _ = tiny
    one = small_run(tmp, "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--data",
           str(tmp / "syn"), "--out", str(tmp / "two"), "--cache-dir", str(tmp / "cache"), "--epochs", "2",
           "--batch-size", "8", "--res", "28", "--bootstrap", "0"]
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("teacher epoch 2:") == 1  # rank 0 alone logs
    for role in ("teacher", "mlcak"):
        a, b = final_weights(tmp / "one", role), final_weights(tmp / "two", role)
        assert a.keys() == b.keys()
        for k in a:  # the same images per step; only the order of floating-point sums differs
            torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=1e-3)
    for row in ("mean local AUROC", "normal/abnormal AUROC"):
        for x, y in zip(table_row(one, row), table_row(two.stdout, row)):
            assert abs(x - y) <= 0.02


def test_the_stage_cache_gives_the_same_batches_from_memory_and_streamed(tiny, monkeypatch):
    from mlcak import model_input, targets_from_teacher
    from vit import VARIANTS, VisionTransformer, ViTConfig
    tmp, _, _ = tiny
    cache = next(str(tmp / "cache" / c) for c in os.listdir(tmp / "cache") if c.startswith("vindr-train-224-"))
    dataset = data.XrayDataset(cache)
    teacher = VisionTransformer(ViTConfig(num_local=22, **VARIANTS["vit_cpu"])).eval()
    student_input = lambda hr: model_input(hr, 28, data.NORM)
    teacher_targets = lambda hr: targets_from_teacher(teacher(model_input(hr, 224, data.NORM), return_attn=True))
    make = lambda: StageCache(dataset, [student_input, teacher_targets], 8, 0, 0, runs.Ddp(torch.device("cpu")))
    kept = make()
    monkeypatch.setattr(StageCache, "LIMIT", 0)  # as if the results did not fit in memory
    streamed = make()
    assert kept.tables and not streamed.tables and kept.steps == streamed.steps == len(dataset) // 8
    for (hr_a, labels_a, index_a), (hr_b, labels_b, index_b) in zip(kept.batches(1), streamed.batches(1)):
        assert hr_a is None and hr_b.shape == (8, 1, 224, 224) and torch.equal(index_a, index_b)
        for x, y in zip(labels_a, labels_b):
            assert torch.equal(x, y)
        assert torch.equal(kept.get(student_input, hr_a, index_a), streamed.get(student_input, hr_b, index_b))
        for x, y in zip(kept.get(teacher_targets, hr_a, index_a), streamed.get(teacher_targets, hr_b, index_b)):
            torch.testing.assert_close(x, y)  # the teacher's targets: computed in batches of another size


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_flags(tmp, out, cache):
    return ["--data", str(tmp / "syn"), "--out", str(out), "--cache-dir", str(cache), "--img-size", "64", "--res", "32",
            "--epochs", "1", "--batch-size", "8", "--bootstrap", "0"]


def test_a_slow_cache_build_on_rank_0_does_not_time_out_the_other_ranks(tiny, tmp_path):
    tmp, _, _ = tiny
    env = dict(os.environ, OMP_NUM_THREADS="1")  # slow_cache.py: build delayed 8 s, process-group timeout 5 s
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/slow_cache.py",
           *ddp_flags(tmp, tmp_path / "runs", tmp_path / "cache")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 1: waiting for local rank 0 to build" in result.stdout and "mlcak epoch 1/1" in result.stdout


def two_machines(tmp, tmp_path, outs):
    """Two processes as two machines of one process each (LOCAL_RANK 0 on both), each with its own cache folder."""
    port, processes = free_port(), []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "train.py", *ddp_flags(tmp, outs[rank], tmp_path / f"disk{rank}" / "cache")]
        processes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=600), *p.communicate()) for p in processes]


def test_two_machines_each_build_their_own_cache_and_train_together(tiny, tmp_path):
    tmp, _, _ = tiny
    results = two_machines(tmp, tmp_path, [tmp_path / "shared"] * 2)
    for code, out, err in results:
        assert code == 0, out + err
    assert "mlcak epoch 1/1" in results[0][1] and "test set:" in results[0][1] and "epoch" not in results[1][1]
    for disk in ("disk0", "disk1"):  # each machine's cache, complete
        caches = os.listdir(tmp_path / disk / "cache")
        assert len(caches) == 2 and all(os.path.isfile(tmp_path / disk / "cache" / c / "meta.json") for c in caches)


def test_an_out_folder_that_the_machines_do_not_share_is_one_line(tiny, tmp_path):
    tmp, _, _ = tiny
    for code, out, err in two_machines(tmp, tmp_path, [tmp_path / "a", tmp_path / "b"]):
        assert code == 1 and "rank(s) [1] do not see rank 0's files there" in err and err.strip().count("\n") == 0


def test_a_killed_run_resumes_to_the_same_weights(tiny):
    tmp, _, _ = tiny
    cmd = [sys.executable, "train.py", "--data", str(tmp / "syn"), "--out", str(tmp / "killed"), "--cache-dir",
           str(tmp / "cache"), "--epochs", "3", "--batch-size", "8", "--res", "28", "--bootstrap", "0", "--log-every", "1"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("teacher epoch 2/3 step"):  # in the middle of the teacher's second epoch
            process.kill()
            break
    process.wait()
    # the epoch last.pt holds: 1, or 2 where the run finished that epoch before the kill reached it (a busy machine)
    done = torch.load(os.path.join(tmp / "killed", os.listdir(tmp / "killed")[0], "last.pt"), weights_only=True)["epoch"]
    assert done in (1, 2)
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600).stdout
    assert "teacher: resuming" in resumed and f"after epoch {done}" in resumed
    small_run(tmp, "straight", epochs=3)
    for role in ("teacher", "mlcak"):
        a, b = final_weights(tmp / "killed", role), final_weights(tmp / "straight", role)
        assert all(torch.equal(a[k], b[k]) for k in a), role  # bitwise: CPU kernels are deterministic here
        killed, straight = (log_rows(next(tmp / f / d for d in os.listdir(tmp / f) if d.startswith(role)))
                            for f in ("killed", "straight"))
        assert [r["epoch"] for r in killed] == ["1", "2", "3"]  # resumed: no row twice, none missing
        columns = [c for c in killed[0] if c not in ("seconds", "images_per_second")]
        assert [[r[c] for c in columns] for r in killed] == [[r[c] for c in columns] for r in straight]


def test_init_from_a_distilled_deit_checkpoint_of_timm_names(tiny, tmp_path):
    tmp, _, _ = tiny
    from vit import VARIANTS, VisionTransformer, ViTConfig
    rgb = VisionTransformer(ViTConfig(in_chans=3, img_size=224, **VARIANTS["vit_tiny"]))  # timm's ViT-Ti/16 layout
    state = {k: v for k, v in rgb.state_dict().items() if not k.startswith("head_")}
    state["head.weight"], state["head.bias"] = torch.randn(1000, 192), torch.randn(1000)
    # deit_tiny_distilled_patch16_224: a distillation token, its head, and its slot in a pos_embed of 198
    state["dist_token"], state["head_dist.weight"], state["head_dist.bias"] = torch.randn(1, 1, 192), torch.randn(1000, 192), torch.randn(1000)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], torch.randn(1, 1, 192), state["pos_embed"][:, 1:]], dim=1)
    torch.save({"model": state}, tmp_path / "deit_distilled.pth")
    out = small_run(tmp, "init", "--model", "vit_tiny", "--img-size", "64", "--init", str(tmp_path / "deit_distilled.pth"),
                    "--no-kd", epochs=1)  # the 14 x 14 position grid resampled to 4 x 4
    assert "init:" in out and "'pos_embed'" in out and "'patch_embed.proj.weight'" in out and "'head.weight'" in out
    assert "'dist_token'" in out and "'head_dist.weight'" in out and "the distillation token's slot" in out
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    cmd = [sys.executable, "train.py", "--data", str(tmp / "syn"), "--out", str(tmp / "cnn"), "--cache-dir",
           str(tmp / "cache"), "--init", str(tmp_path / "resnet.pth"), "--no-kd"]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert "resnet.pth: not a timm/DeiT ViT state_dict" in bad.stderr


def test_amp_and_compile_run_and_save_clean_keys(tiny):
    tmp, _, _ = tiny
    try:
        torch.compile(torch.nn.Linear(2, 2))(torch.randn(1, 2))
    except Exception as err:  # no compiler toolchain on this machine
        pytest.skip(f"torch.compile cannot run here: {err}")
    small_run(tmp, "compiled", "--amp", "--compile", "--no-kd", epochs=1)
    keys = final_weights(tmp / "compiled", "baseline")
    assert "pos_embed" in keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


def test_bench_runs_every_measurement_on_given_data_and_leaves_no_run_folder(tmp_path):
    # bench.py's numbers are measurements, not asserted here: only that each row is there and each rate is positive
    root = synthetic.make_synthetic(str(tmp_path / "syn"), n_train=40, n_test=8, seed=1, workers=1, verbose=False)
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, "-m", "machinery.bench", "--variants", "vit_cpu", "--seconds", "0.01", "--batch-size", "8",
                             "--data", root, "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(re.findall(r"^  (\S.*?)\s+([\d.]+) img/s$", result.stdout, re.M))
    for name in ("train, ours explicit attention", "train, ours fused attention (teacher, baseline)",
                 "train, reference (nn.TransformerEncoderLayer)", "inference, ours fused",
                 "inference, ours explicit (attention returned)", "inference, reference",
                 "mlcak step, teacher targets looked up (train.py)", "mlcak step, teacher run at each step",
                 "student input (mlcak.model_input at 28)"):
        assert float(rows[name]) > 0, name
    assert re.search(r"ratio data loader / fused train step +[\d.]+ \(loader \d+ img/s\)", result.stdout)
    assert re.search(rf"train.py's loop, 3 epochs on {re.escape(root)}: teacher \d+ img/s", result.stdout)
    assert not [p for p in os.listdir(tmp_path / "tmp") if p.startswith("mlcak-bench-")]  # the loop's checkpoints removed


@pytest.mark.parametrize("variant", ["vit_cpu_wide", "vit_cpu_deep"])
def test_each_cpu_variant_trains_compare_runs_in_folders_of_its_name_and_is_listed_by_help(tiny, variant):
    tmp, _, _ = tiny
    out = tmp / f"runs-{variant}"
    result = run("train.py", "--data", str(tmp / "syn"), "--out", str(out), "--cache-dir", str(tmp / "cache"), "--epochs",
                 "1", "--batch-size", "8", "--res", "28", "--compare", "--bootstrap", "0", "--model", variant)
    assert "mlcak@28" in result.stdout and "baseline@28" in result.stdout
    for folder in os.listdir(out):
        if os.path.isdir(out / folder) and not folder.startswith("table-"):
            ckpt = torch.load(out / folder / "best.pt", weights_only=True)
            assert ckpt["args"]["model"] == variant and ckpt["vit_config"]["embed_dim"] == {"vit_cpu_wide": 192, "vit_cpu_deep": 96}[variant]
    default = {d for d in os.listdir(tmp / "runs") if not d.startswith("table-")}
    assert not default & set(os.listdir(out))  # another model: other run folders, never the default's reused
    assert variant in run("train.py", "--help").stdout

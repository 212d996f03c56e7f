"""Multi-process runs on CPU (gloo): DDP training keeps every rank's weights equal to the checkpoint, and
sharded certification (by hand, or automatic under torchrun) merges into exactly the unsharded rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from certkit import checkpoint
from certkit.cli import main
from certkit.data import dataset_info, load_dataset
from certkit.errors import CertkitError
from certkit.objectives import Objective
from certkit.objectives.gaussian import Gaussian
from certkit.objectives.smoothmix import SmoothMix
from certkit.results import read_results, summary_path
from certkit.train import TrainConfig, Trainer
from helpers import quiet_trainer, write_idx

#: the multi-process tests (torchrun, gloo) are slow; the in-process ones at the end are not
slow = pytest.mark.slow

WORLD = 2
# a tiny, cheap certification: enough samples that radii differ between inputs. ``--N`` and ``--max-index``, not
# ``--n`` and ``--max``: torchrun's own parser reads abbreviations even after the script's name, and those two
# abbreviate its options (the spellings torchrun users must use; the same list serves the in-process runs)
CERTIFY = ["--N0", "20", "--N", "200", "--alpha", "0.01", "--batch", "200", "--seed", "3", "--max-index", "10"]


def make_block_dataset(root: Path, n_train: int = 24, n_test: int = 10, seed: int = 0) -> Path:
    """A small learnable MNIST-format set (gzipped IDX): the class is a bright band at a class-dependent
    height on a noisy background, so a few SGD steps already give inputs different votes and radii."""
    gen = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = gen.integers(0, 10, n)
        images = gen.integers(0, 80, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 6, 4:24] = 250
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _trainer(data_dir: str, out: str | None, objective: Objective | None = None, seed: int = 0) -> Trainer:
    """The tests' LeNet trainer: 3 epochs of batch 4 per process; ``seed`` sets this process's initial weights."""
    info = dataset_info("mnist")
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.1, schedule="constant", seed=0)
    torch.manual_seed(seed)
    train = load_dataset("mnist", "train", data_dir)
    objective = objective or Gaussian(0.25)
    return quiet_trainer("lenet", info.in_shape, objective, train, None, cfg, out, (info.mean, info.std))


def _train_worker(rank: int, init_file: str, data_dir: str, run_dir: str, dump_dir: str) -> None:
    """One DDP rank: train, then dump this rank's weights; then a control run without gradient sync."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:

        def trainer(out: str | None, objective: Objective | None = None) -> Trainer:
            # different initial weights on each rank: DDP must start every rank from rank 0's
            return _trainer(data_dir, out, objective, seed=100 + rank)

        ddp = trainer(run_dir)
        assert ddp.world_size == WORLD
        save_file({k: v.contiguous() for k, v in ddp.model.state_dict().items()}, f"{dump_dir}/ddp{rank}.safetensors")
        ddp.fit()
        save_file(
            {k: v.contiguous() for k, v in ddp.model.state_dict().items()}, f"{dump_dir}/trained{rank}.safetensors"
        )

        # control: the same ranks with DDP's gradient all-reduce bypassed must drift apart, which shows that
        # the equality above is DDP's doing and that the comparison below can fail
        control = trainer(None)
        control.net = control.model
        control.fit()
        save_file(
            {k: v.contiguous() for k, v in control.model.state_dict().items()}, f"{dump_dir}/control{rank}.safetensors"
        )

        # SmoothMix makes two training calls before one backward, as the reference code does
        two_calls = trainer(None, SmoothMix(0.25, num_noise_vec=2, num_steps=1, mix_step=0))
        two_calls.fit()
        save_file(
            {k: v.contiguous() for k, v in two_calls.model.state_dict().items()},
            f"{dump_dir}/twocalls{rank}.safetensors",
        )

        # a step whose loss is NaN on rank 1 alone, its last of the first epoch: the gradient all-reduce puts
        # NaN into rank 0's weights too, so both ranks must stop before rank 0 saves anything
        class DivergesOnRank1(Gaussian):
            calls = 0

            def loss(self, model, x, y):
                loss, parts = super().loss(model, x, y)
                self.calls += 1
                return (loss * float("nan"), parts) if rank == 1 and self.calls == 3 else (loss, parts)

        try:
            trainer(f"{dump_dir}/diverged", DivergesOnRank1(0.25)).fit()
        except CertkitError as e:
            Path(f"{dump_dir}/diverged{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()
    # every file is written: leave without the interpreter's teardown, where a spawned gloo worker sometimes
    # aborts in C++ after all Python code has finished ("terminate called without an active exception"; about
    # 1 run in 8 on this machine, with or without certkit's changes), which mp.spawn reports as a failure
    os._exit(0)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(path: Path) -> list[tuple]:
    r = read_results(path)
    return list(zip(r.idx.tolist(), r.label.tolist(), r.predict.tolist(), r.radius.tolist(), r.correct.tolist()))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = make_block_dataset(root / "data")
    run, dumps = root / "run", root / "dumps"
    run.mkdir()
    dumps.mkdir()
    mp.spawn(_train_worker, args=(str(root / "init"), str(data), str(run), str(dumps)), nprocs=WORLD, join=True)
    return {"root": root, "data": data, "run": run, "dumps": dumps}


@slow
def test_ddp_checkpoint_equals_the_weights_on_every_rank(ddp_run):
    dumps = ddp_run["dumps"]
    start = [load_file(dumps / f"ddp{r}.safetensors") for r in range(WORLD)]
    trained = [load_file(dumps / f"trained{r}.safetensors") for r in range(WORLD)]
    control = [load_file(dumps / f"control{r}.safetensors") for r in range(WORLD)]
    saved = checkpoint.load(ddp_run["run"]).state_dict()
    # DDP broadcast rank 0's initial weights although each rank built its own
    assert _equal(start[0], start[1])
    # training moved the weights, and every rank ends with exactly the checkpoint rank 0 wrote
    assert not _equal(trained[0], start[0])
    for r in range(WORLD):
        assert _equal(trained[r], saved), f"rank {r} differs from the checkpoint"
    assert checkpoint.read_meta(ddp_run["run"])["world_size"] == WORLD
    # the control (no gradient sync) drifts apart: the check above is able to fail
    assert not _equal(control[0], control[1])


@slow
def test_a_step_non_finite_on_one_rank_stops_every_rank_before_anything_is_saved(ddp_run):
    dumps = ddp_run["dumps"]
    for r in range(WORLD):
        assert "training diverged at epoch 1" in (dumps / f"diverged{r}.txt").read_text(), f"rank {r} went on"
    assert not (dumps / "diverged" / "model.safetensors").exists()


@slow
def test_the_cost_ledger_counts_every_ranks_steps_and_image_passes(ddp_run):
    """24 training images a epoch, 12 on each rank in 3 steps of 4: the job passed 24 images in 6 steps."""
    epochs = checkpoint.read_meta(ddp_run["run"])["cost"]["epochs"]
    assert [(e["steps"], e["forward"], e["backward"]) for e in epochs] == [(6, 24, 24)] * 3


@slow
def test_resuming_with_another_process_count_is_refused(ddp_run, tmp_path: Path):
    """--batch-size is per process: a run of 2 processes resumed by 1 would change its batch mid-run."""
    run = tmp_path / "run"
    shutil.copytree(ddp_run["run"], run)
    with pytest.raises(CertkitError, match="run was started with torchrun --nproc-per-node 2, not 1"):
        _trainer(str(ddp_run["data"]), str(run)).resume()


@slow
def test_ddp_reduces_a_step_of_two_training_calls(ddp_run):
    """SmoothMix's clean and mixed calls before one backward: DDP's reducer sums each parameter's gradient
    over both and every rank takes the same step (the control above shows ranks drift without the sync)."""
    dumps = ddp_run["dumps"]
    start = load_file(dumps / "ddp0.safetensors")
    trained = [load_file(dumps / f"twocalls{r}.safetensors") for r in range(WORLD)]
    assert not _equal(trained[0], start)
    assert _equal(trained[0], trained[1])


def _certify(ddp_run: dict[str, Path], out: Path, *extra: str) -> list[tuple]:
    args = ["certify", str(ddp_run["run"]), "--dataset", "mnist", "--data-dir", str(ddp_run["data"]), "--device", "cpu"]
    assert main([*args, *CERTIFY, *extra, "--out", str(out)]) == 0
    return _rows(out)


@pytest.fixture(scope="module")
def unsharded(ddp_run) -> list[tuple]:
    rows = _certify(ddp_run, ddp_run["root"] / "whole.tsv")
    assert [r[0] for r in rows] == list(range(10))
    # not vacuous: predictions and radii differ between inputs, so a mix-up of rows would show
    assert len({r[2] for r in rows}) > 1 and len({r[3] for r in rows}) > 1
    return rows


@slow
def test_shards_merge_into_the_unsharded_rows(ddp_run, unsharded, tmp_path: Path):
    shards = [tmp_path / f"s{i}.tsv" for i in range(WORLD)]
    shard_rows = [_certify(ddp_run, path, "--shard", f"{i}/{WORLD}") for i, path in enumerate(shards)]
    assert [[r[0] for r in rows] for rows in shard_rows] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert main(["merge", *map(str, shards), "--out", str(tmp_path / "merged.tsv")]) == 0
    assert _rows(tmp_path / "merged.tsv") == unsharded
    # the comparison can fail: noise from another seed gives other rows
    assert _certify(ddp_run, tmp_path / "other.tsv", "--seed", "4") != unsharded


def _torchrun_certify(ddp_run: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        # after "--" torchrun passes every flag on untouched, so certkit's own spellings --n and --max work too
        "-m",
        "certkit",
        "--",
        "certify",
        str(ddp_run["run"]),
        "--dataset",
        "mnist",
        "--data-dir",
        str(ddp_run["data"]),
        "--device",
        "cpu",
        *[a.lower() if a in ("--N", "--N0") else "--max" if a == "--max-index" else a for a in CERTIFY],
        *extra,
        "--out",
        str(out),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@slow
def test_torchrun_certify_shards_automatically_and_rank0_merges(ddp_run, unsharded, tmp_path: Path):
    out = tmp_path / "auto.tsv"
    proc = _torchrun_certify(ddp_run, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _rows(out) == unsharded
    # rank 0 alone prints, writes the merged file's summary and removes the shard files it merged
    assert proc.stdout.count("wrote") == 1
    assert json.loads(summary_path(out).read_text())["N"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.summary.json", "auto.tsv", "auto.tsv.json"]


@slow
def test_torchrun_certify_refuses_a_users_json_beside_its_output_before_any_rank_certifies(ddp_run, tmp_path: Path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    proc = _torchrun_certify(ddp_run, tmp_path / "notes")
    assert proc.returncode != 0 and "notes.json, which exists and is not certkit's settings file" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"] and notes.read_text() == '{"my": "notes"}'


@pytest.mark.parametrize(
    "device, cuda, gpus, expect",
    [
        ("cpu", True, 1, "gloo"),
        ("auto", False, 0, "gloo"),
        ("auto", True, 2, "nccl"),
        ("cuda", True, 1, "refused"),
        ("cuda:0", True, 2, "one GPU each"),
    ],
)
def test_backend_follows_the_device_and_ranks_must_fit_the_gpus(monkeypatch, device, cuda, gpus, expect):
    """gloo for CPU ranks even where CUDA exists; local rank 1 on a one-GPU machine is one line, not a crash;
    so is a --device cuda:N that would put every rank on GPU N. Every job also gets a gloo group with a long
    timeout for the waits at the end of a certification."""
    from certkit import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    chosen: list[str] = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: chosen.append(backend))
    waits: list[dict] = []
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: waits.append(kw))
    if expect == "refused":
        with pytest.raises(CertkitError, match="local rank 1 but this machine has 1 GPU"):
            distributed.init_from_env(device)
    elif expect == "one GPU each":
        with pytest.raises(CertkitError, match="--device cuda:0: under torchrun each process takes the GPU of its"):
            distributed.init_from_env(device)
    else:
        assert distributed.init_from_env(device) and chosen == [expect]
        assert waits == [{"backend": "gloo", "timeout": distributed.WAIT_TIMEOUT}]
        assert distributed.WAIT_TIMEOUT.days >= 7


@slow
def test_torchrun_certify_resumes_an_existing_file_and_refuses_other_settings(ddp_run, unsharded, tmp_path: Path):
    """An existing --out is resumed as one process resumes it: its rows are kept as written (row 0's time is
    marked, and survives), only the rest are certified, and another seed is refused with the file untouched."""
    out = tmp_path / "grow.tsv"
    _certify(ddp_run, out, "--max-index", "6")
    lines = out.read_text().splitlines()
    lines[1] = "\t".join([*lines[1].split("\t")[:-1], "0:00:09"])
    out.write_text("\n".join(lines) + "\n")
    proc = _torchrun_certify(ddp_run, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _rows(out) == unsharded
    assert out.read_text().splitlines()[1].endswith("\t0:00:09")
    before, files = out.read_bytes(), sorted(tmp_path.iterdir())
    proc = _torchrun_certify(ddp_run, out, "--seed", "4")
    assert proc.returncode != 0 and "certkit: error: cannot resume" in proc.stderr and "differ in seed" in proc.stderr
    # rank 0 found it; the other rank, unless torchrun stopped it first (a race a loaded machine can lose),
    # says in one line that it stopped, never that something unexpected happened
    assert "unexpected" not in proc.stderr
    rank1 = [line for line in proc.stderr.splitlines() if "rank 1:" in line]
    assert all("rank 1: another process of this job stopped" in line for line in rank1), rank1
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == files  # no shard files left behind


@slow
def test_shard_under_torchrun_is_refused(ddp_run, tmp_path: Path):
    proc = _torchrun_certify(ddp_run, tmp_path / "s.tsv", "--shard", "0/2")
    assert proc.returncode != 0 and "--shard splits a run by hand" in proc.stderr
    assert not (tmp_path / "s.tsv").exists()


def test_each_rank_crops_and_flips_its_own_way():
    """The epoch's permutation is shared by the ranks; the crop and flip draws are not. Every image is the same
    (one bright pixel), so equal draws would give equal batches whatever images each rank reads."""
    from certkit.data import ArrayDataset

    info = dataset_info("cifar10")
    images = torch.zeros(16, *info.in_shape, dtype=torch.uint8)
    images[:, :, 5, 20] = 255
    data = ArrayDataset(info, images, torch.arange(16) % 10, augment=True)

    def first_batch(rank: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return next(data.batches(8, shuffle=True, generator=generator, rank=rank, world_size=2))[0]

    assert torch.equal(first_batch(0, 1), first_batch(0, 1))  # a rank's draws follow the seed
    assert not torch.equal(first_batch(0, 1), first_batch(1, 1))


def test_the_ranks_vote_checks_combine_into_one():
    """Each rank checks the first inputs of its own shard; the merged summary holds all of them, the mean
    agreement weighted by inputs and the lowest input's agreement."""
    from certkit.cli import _combined_speed_check

    rank0 = {"options": {"amp": "bf16"}, "vote_agreement": 1.0, "min_input_agreement": 1.0, "inputs": [0, 2]}
    rank1 = {"options": {"amp": "bf16"}, "vote_agreement": 0.998, "min_input_agreement": 0.995, "inputs": [1, 3, 5]}
    combined = _combined_speed_check([rank0, rank1])
    assert combined["inputs"] == [0, 1, 2, 3, 5] and combined["options"] == {"amp": "bf16"}
    assert combined["vote_agreement"] == pytest.approx((2 * 1.0 + 3 * 0.998) / 5)
    assert combined["min_input_agreement"] == 0.995

"""Data-parallel training (trainer=ddp) on CPU with 2 gloo processes, through the CLI.

One real 2-process run, shared by the tests below, exercises the hardest combination:
lp_ft (the trainable set changes after the first epoch: find_unused_parameters, freezing
after DDP wraps the network), its first epoch on the feature cache (sharded extraction),
the head solved by L-BFGS, backbone BatchNorm learning its statistics (SyncBatchNorm by
default then) and early stopping after two of three epochs. A probe callback writes what
each rank saw (tests/probes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from clitools import composed, error_line, run_id_of, train_in, transferlab

TESTS = Path(__file__).resolve().parent
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
TINY = ["data=digits", "data.samples_per_class=10", "data.batch_size=16", "data.image_size=32"]
PROBE = [
    "allowed_targets=[torch.optim.*,pytorch_lightning.callbacks.*,transferlab.*,probes.*]",
    "+callbacks.probe._target_=probes.RankProbe",
]
RUN = [
    *DDP, *TINY, *PROBE,
    "finetune=lp_ft", "finetune.bn=train", "trainer.max_epochs=3",
    "callbacks.early_stopping.patience=1", "+callbacks.early_stopping.min_delta=1.0",
]  # fmt: skip


def env() -> dict[str, str]:
    return {"PYTHONPATH": str(TESTS)}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """(working folder, run folder, MLflow run id, stdout) of one 2-process run."""
    cwd = tmp_path_factory.mktemp("ddp")
    folder, run_id, result = train_in(cwd, *RUN, env=env())
    return cwd, folder, run_id, result.stdout


def probes(folder: Path) -> list[dict]:
    return [json.loads((folder / f"probe_rank{r}.json").read_text()) for r in range(2)]


def client_at(cwd: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def test_one_mlflow_run_recorded_by_rank_zero_alone(ddp_run) -> None:
    cwd, folder, run_id, stdout = ddp_run
    client = client_at(cwd)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    zero, one = probes(folder)
    assert (zero["world_size"], zero["rank"], one["rank"]) == (2, 0, 1)
    assert zero["logger"] and zero["mlflow_run"]
    assert not one["logger"] and not one["mlflow_run"]  # rank 1 never opened the store
    # Every rank trains on as many images: throughput counts both.
    assert runs[0].data.metrics["perf/train_images_per_s"] > 0
    assert "2 cores shared by 2 DDP processes" in stdout


def test_test_metrics_equal_a_single_process_evaluation(ddp_run) -> None:
    """Metrics synced over the ranks, each test image counted once: `transferlab eval` of
    the same checkpoint on one process gives the same numbers, and the confusion matrix
    sums to the test split."""
    cwd, _folder, run_id, _ = ddp_run
    client = client_at(cwd)
    logged = client.get_run(run_id).data.metrics
    result = transferlab("eval", f"run={run_id}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    single = client.get_run(run_id_of(result.stdout)).data.metrics
    for name in ("test/acc", "test/f1", "test/loss"):
        assert single[name] == pytest.approx(logged[name], abs=1e-6), name
    datamodule_cfg = composed(cwd, *TINY)
    from transferlab.build import build_datamodule

    test_size = len(build_datamodule(datamodule_cfg).test_set)
    table = client.download_artifacts(run_id, "test/per_class_metrics.csv", str(cwd))
    support = [int(row.split(",")[1]) for row in Path(table).read_text().splitlines()[1:]]
    assert sum(support) == test_size


def test_each_rank_trains_on_its_shard_and_the_shards_make_the_subset(ddp_run) -> None:
    cwd, folder, _, _ = ddp_run
    from probes import digest

    from transferlab.build import build_datamodule

    train_set = build_datamodule(composed(cwd, *TINY)).train_set
    subset = {digest(train_set[i]["image"]) for i in range(len(train_set))}
    zero, one = probes(folder)
    epoch = "1"  # epoch 0 trained the head on cached features
    a, b = zero["images"][epoch], one["images"][epoch]
    assert len(a) == len(b) == -(-len(train_set) // 2)
    assert set(a) | set(b) == subset
    assert len(set(a) & set(b)) <= len(train_set) % 2  # only the padding repeats


def test_ranks_end_with_the_same_weights_after_unfreezing(ddp_run) -> None:
    """lp_ft unfreezes the backbone after DDP wrapped the network: its gradients must still
    be all-reduced, or the ranks drift apart."""
    zero, one = probes(ddp_run[1])
    assert zero["weights"] == one["weights"]


def test_the_feature_cache_is_the_whole_split_on_every_rank(ddp_run) -> None:
    cwd, folder, _, _ = ddp_run
    from transferlab.build import build_datamodule

    train_set = build_datamodule(composed(cwd, *TINY)).train_set
    zero, one = probes(folder)
    assert zero["features"] is not None and zero["features"] == one["features"]
    labels = [int(train_set[i]["label"]) for i in range(len(train_set))]
    assert zero["feature_labels"] == one["feature_labels"] == labels  # gathered in order


def test_batchnorm_statistics_stay_per_rank_on_cpu_and_sync_on_gpus(ddp_run) -> None:
    """SyncBatchNorm (PyTorch's: GPUs only) where the backbone's BatchNorm learns its
    statistics: timm's converter, which keeps its fused activation; plain on CPU."""
    from pytorch_lightning.plugins import LayerSync

    from transferlab.distributed import use_sync_batchnorm
    from transferlab.finetune import build_strategy
    from transferlab.models import build_classifier
    from transferlab.models.sync_batchnorm import TimmSyncBatchNorm

    zero, one = probes(ddp_run[1])
    assert "BatchNormAct2d" in zero["norm_layers"] and zero["norm_layers"] == one["norm_layers"]
    learns, keeps = (
        build_strategy({"strategy": "full", "bn": "train"}),
        build_strategy({"strategy": "full"}),
    )
    assert use_sync_batchnorm("auto", learns, "cuda") and not use_sync_batchnorm(
        "auto", keeps, "cuda"
    )
    assert not use_sync_batchnorm("auto", learns, "cpu")
    network = TimmSyncBatchNorm().apply(build_classifier(composed(ddp_run[0], *TINY).model, 10))
    kinds = {type(m).__name__ for m in network.modules() if "Norm" in type(m).__name__}
    assert kinds == {"SyncBatchNormAct"} and isinstance(TimmSyncBatchNorm(), LayerSync)


def test_sync_batchnorm_on_cpu_is_one_line(tmp_path: Path) -> None:
    result = transferlab("train", *DDP, *TINY, "trainer.sync_batchnorm=true", cwd=tmp_path)
    assert "trainer.sync_batchnorm=true needs GPUs" in error_line(result)


def test_early_stopping_stops_every_rank_together(ddp_run) -> None:
    cwd, folder, run_id, _ = ddp_run
    zero, one = probes(folder)
    assert zero["epochs"] == one["epochs"] == 2  # of max_epochs=3
    checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # best + last, written once
    history = client_at(cwd).get_metric_history(run_id, "val/acc")
    assert [m.step for m in history] == [0, 1]


def test_rank_zero_alone_decides_by_the_launch_environment() -> None:
    from transferlab.distributed import is_rank_zero, launched_externally

    assert is_rank_zero({}) and not launched_externally({})
    assert not is_rank_zero({"LOCAL_RANK": "1", "NODE_RANK": "0"})
    assert not is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "1"})
    assert is_rank_zero({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "LOCAL_RANK": "0"})
    assert not is_rank_zero({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"})
    assert is_rank_zero({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert not is_rank_zero({"RANK": "3", "LOCAL_RANK": "0"})
    assert launched_externally({"SLURM_NTASKS": "2"}) and launched_externally({"RANK": "0"})


def test_the_training_sampler_shards_each_epochs_order() -> None:
    from transferlab.data.samplers import EpochShuffleSampler

    whole = list(EpochShuffleSampler(11, seed=3, epoch=2))
    shards = []
    for rank in range(3):
        sampler = EpochShuffleSampler(11, seed=3, epoch=2)
        sampler.rank, sampler.world_size = rank, 3
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(set().union(*shards)) == sorted(whole)
    assert shards[0] == whole[0::3] and shards[2] == [*whole[2::3], whole[0]]


def test_evaluation_shards_are_blocks_that_rejoin_in_order() -> None:
    from transferlab.data.samplers import ShardSampler

    blocks = [list(ShardSampler(11, rank, 3)) for rank in range(3)]
    assert [len(b) for b in blocks] == [4, 4, 3]
    assert [i for block in blocks for i in block] == list(range(11))


def test_resuming_a_ddp_run_asks_for_one_process_in_one_line(ddp_run) -> None:
    cwd, folder, run_id, _ = ddp_run
    before = client_at(cwd).get_run(run_id).data.metrics
    result = transferlab("train", f"resume={folder}", cwd=cwd)
    assert "add trainer.devices=1" in error_line(result)
    assert client_at(cwd).get_run(run_id).data.metrics == before


def test_the_multi_node_slurm_preset_asks_for_a_task_per_device(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from transferlab import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose(
            "train",
            overrides=[*DDP, "trainer.devices=4", "trainer.num_nodes=2",
                       "hydra/launcher=slurm_ddp"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher._target_.endswith("SlurmLauncher")


@pytest.mark.slow
def test_ddp_jobs_of_a_multirun_each_start_their_own_workers(tmp_path: Path) -> None:
    """Each job of a sweep starts its ranks as single runs of its own overrides: one parent,
    two FINISHED children, each job's rank 1 logged in its own folder."""
    result = transferlab(
        "train", "-m", *DDP, *TINY, "trainer.max_epochs=1", "optimizer.lr=1e-3,3e-3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_at(tmp_path)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.params["optimizer.lr"] for r in children) == ["0.001", "0.003"]
    for job in ("0", "1"):
        log = (tmp_path / "sweep" / job / "ddp_rank1.log").read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log


@pytest.mark.slow
def test_a_rank_that_fails_mid_epoch_ends_the_job_with_its_error(tmp_path: Path) -> None:
    fault = [
        "allowed_targets=[torch.optim.*,pytorch_lightning.callbacks.*,transferlab.*,faults.*]",
        "+callbacks.fault._target_=faults.FailOnRank",
        "+callbacks.fault.rank=1",
        "+callbacks.fault.batch=1",
    ]
    result = transferlab("train", *DDP, *TINY, *fault, cwd=tmp_path, env=env(), timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # after MLflow's notes on a new store
    assert last == "transferlab: error: DDP rank 1 failed: RuntimeError: injected failure on rank 1"
    assert "Traceback" not in result.stderr


def test_ddp_from_python_without_the_cli_is_one_user_error(tmp_path: Path) -> None:
    from transferlab.errors import UserError
    from transferlab.train import run

    with pytest.raises(UserError, match="starts from the command line"):
        run(composed(tmp_path, *DDP, *TINY, "tracking.enabled=false"))

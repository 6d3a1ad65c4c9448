"""``transferlab reproduce <run id | run folder>``: train again from what a run recorded,
then say whether the results match.

The new run is composed from the recorded overrides (``.hydra/overrides.yaml``), so it gets
the same config, seed and data; it is tagged ``reproduces=<run id>``. What could make the
results differ is compared and reported: the code (git commit and dirty flag), the package
versions, the thread count and the data fingerprint. On the same machine, code and thread
count a CPU run gives identical test metrics.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

from transferlab.errors import UserError

# What the comparison covers: the results, and what a run records about where it ran.
RESULT_PREFIXES = ("test/", "best/")
CONDITIONS = ("git.commit", "git.dirty", "speed.threads", "machine.cpu")


def differences(before: Mapping[str, str], after: Mapping[str, str], keys: Sequence[str]):
    """(key, before, after) for each of ``keys`` whose value changed."""
    return [
        (k, before.get(k, "-"), after.get(k, "-")) for k in keys if before.get(k) != after.get(k)
    ]


def compare_results(original: Any, again: Any) -> list[tuple[str, float, float, bool]]:
    """(metric, original, reproduced, identical) for every test and best metric."""
    keys = sorted(k for k in original.data.metrics if k.startswith(RESULT_PREFIXES))
    rows = []
    for key in keys:
        first, second = original.data.metrics[key], again.data.metrics.get(key, math.nan)
        rows.append((key, first, second, first == second))
    return rows


def main(argv: list[str]) -> int:
    import mlflow

    from transferlab.resume import recorded_overrides, run_folder
    from transferlab.tracking.store import existing_store_uri

    parser = argparse.ArgumentParser(
        prog="transferlab reproduce",
        description="Train again from what a finished run recorded; compare the results.",
    )
    parser.add_argument("target", help="the run's MLflow id or its output folder")
    parser.add_argument("--store-dir", default="mlruns", help="local store folder (mlruns)")
    args = parser.parse_args(argv)

    folder, run_id = run_folder(args.target, args.store_dir, f"reproduce {args.target}")
    client = mlflow.MlflowClient(existing_store_uri(args.store_dir))
    original = client.get_run(run_id)
    if original.info.status != "FINISHED":
        raise UserError(f"run {run_id} is {original.info.status}: reproduce a finished run")
    overrides = recorded_overrides(folder, drop=("hydra.run.dir", "resume", "reproduces"))
    print(f"Reproducing run {run_id} with: transferlab train {' '.join(overrides)}", flush=True)

    from transferlab.train import launch

    launch([*overrides, f"reproduces='{run_id}'"])
    found = client.search_runs(
        [original.info.experiment_id],
        filter_string=f"tags.reproduces = '{run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise UserError(f"the reproduced run of {run_id} was not recorded")
    return report(original, found[0])


def report(original: Any, again: Any) -> int:
    """Print the comparison; 0 when every result is identical, 1 otherwise."""
    rows = compare_results(original, again)
    width = max(len(key) for key, *_ in rows) if rows else 0
    lines = [f"\nRun {again.info.run_id} reproduces {original.info.run_id}:"]
    lines += [
        f"  {key:<{width}}  {first:.6f}  {second:.6f}  {'identical' if same else 'DIFFERENT'}"
        for key, first, second, same in rows
    ]
    before, after = original.data.tags, again.data.tags
    versions = sorted(k for k in {*before, *after} if k.startswith("version."))
    changed = differences(before, after, [*CONDITIONS, "data.fingerprint", *versions])
    lines += [f"  note: {key} was {a!r}, now {b!r}" for key, a, b in changed]
    print("\n".join(lines), flush=True)
    if all(same for *_, same in rows):
        print("The results are identical.")
        return 0
    reason = (
        "what changed is listed above"
        if changed
        else "same code, versions, threads and data: a source of nondeterminism remains"
    )
    raise UserError(f"the reproduced results differ from run {original.info.run_id} ({reason})")

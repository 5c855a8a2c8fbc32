"""torchrun with 2 ranks on the CPU (the Trainer wraps DDP over gloo): what the base costs
each rank when every rank attaches the held model, against every rank calling
`from_pretrained`. Same run, same machine, same generated Llama.

Per rank: private memory growth from before the model to after 3 LoRA steps
(/proc/self/smaps_rollup), whether the arena is still mapped (a `.to("cpu:0")` would have
copied it away), and how much of the arena became the rank's own (a DDP broadcast into
the base would have). Prints a table and the ratio basehold / from_pretrained, then the
arena copied per rank under each DDP wrapper (by hand, accelerate's `prepare`, Trainer),
none with `lease_callback`.

    .venv/bin/python bench/torchrun_memory.py [--params-m 80]
"""

from __future__ import annotations

import argparse
import json

from common import discard, server, wait_ready, workspace

from tests.worker.ddp_worker import launch

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=80)
    args = parser.parse_args()
    work, path = workspace(args.params_m)
    try:
        env = {"BASEHOLD_MODEL_ROOTS": json.dumps([str(path.parent)])}
        with server(work, env=env) as served:
            body = {"source": str(path), "name": "ranks", "dtype": "float32"}
            served.http.post("/v1/models", json=body).raise_for_status()
            wait_ready(served.http, "ranks", process=served.process)
            url = str(served.http.base_url).rstrip("/")
            rows = [
                r for mode in ("trainer", "plain") for r in launch(url, "ranks", path, work, mode)
            ]
            wrappers = launch(url, "ranks", path, work, "basehold")
    finally:
        discard(work)
    model = rows[0]["runs"][0]["model_bytes"]
    print(f"\ntorchrun --nproc_per_node 2, CPU, Llama {model / MiB:.0f} MiB (float32), 3 steps")
    print(
        "\n| ranks get the base by | rank | private growth (MiB) | growth / model "
        "| arena mapped | arena pages copied (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        by = "basehold attach" if r["mode"] == "trainer" else "from_pretrained"
        print(
            f"| {by} | {r['rank']} | {r['private_growth'] / MiB:.1f} | "
            f"{r['private_growth'] / model:.1%} | {r['arena_mapped']} | "
            f"{r['runs'][0]['arena_copied'] / MiB:.1f} |"
        )
    ours = sum(r["private_growth"] for r in rows if r["mode"] == "trainer")
    theirs = sum(r["private_growth"] for r in rows if r["mode"] == "plain")
    print(f"\nprivate growth of both ranks, basehold / from_pretrained: {ours / theirs:.3f}")
    # What training itself keeps (activations, adapters, optimizer, DDP buckets, malloc
    # arenas) is what a from_pretrained rank grows by beyond the model's bytes.
    training = theirs / 2 - model
    beyond = ours / 2 - training
    print(
        f"the training's own growth per rank (from_pretrained growth - model): "
        f"{training / MiB:.1f} MiB; basehold's per rank beyond it: "
        f"{beyond / MiB:+.1f} MiB ({beyond / model:+.1%} of the model)"
    )

    print("\n| DDP built by | rank | arena pages copied (MiB) | of the model |")
    print("|---|---|---|---|")
    for r in wrappers:
        for run in r["runs"]:
            print(
                f"| {run['wrapper']} | {r['rank']} | {run['arena_copied'] / MiB:.2f} | "
                f"{run['arena_copied'] / run['model_bytes']:.2%} |"
            )


if __name__ == "__main__":
    main()

"""Prove a GPU node serves basehold's handles, in one run of at most 8 minutes.

    python bench/gpu_check.py                    # on a node with a CUDA GPU
    python bench/gpu_check.py --rehearse-on-cpu  # the same flow without one (CI runs it)

Every stage runs, whatever the others did, and prints one JSON line:
`{"stage", "ok" (true, false, or null when skipped), "figures", "error"}` plus
`"skipped": reason`; a stage that needs an earlier stage's product is skipped when that
stage failed. A `{"summary": ...}` line ends the run (failed and skipped stages, figures
that missed their targets); the exit code is 1 if any stage failed.

Stages: versions and the driver; the loader template and gpu_check's worker template
leave CUDA uninitialized (PYTORCH_NVML_BASED_CUDA_CHECK=1); a process exports a CUDA VMM
segment and exits; the memory survives with only this process's fd (as the service holds
it); workers import it as this uid, as another uid and in another PID namespace (skipped
with the reason where unshare is not permitted); a read-only mapping is accepted and a
write through it refused; the memory is freed after the last fd; a real `basehold serve`
loads fp32, bf16, nf4 and 8-bit against `from_pretrained` on the GPU (time ratios, logits
from an attached worker); the GPU peak while a load is placed; attach time (and LoRA
steps over the attached base); four workers' memory (~1x the model); a forced unload,
measured on the model's own segments once its loader has exited.

`--budget SECONDS` bounds the run (stages that would start past it are skipped:
"budget"). `--rehearse-on-cpu` runs the same stages with the host stand-in for device
segments (tests/common/handles/host_segments.py): everything but the CUDA calls.
`BASEHOLD_GPU_CHECK_FAIL=stage[,stage]` fails the named stages after they ran (rehearsal:
one failure hides nothing else).

This module imports nothing heavy at the top: its workers' forkserver imports it again
in each worker, and tests read `WORKER_PRELOAD` from it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# What gpu_check's worker template (a forkserver) imports before it forks each worker: ~6 s
# of imports a worker saves. Never what initializes CUDA: bitsandbytes calls
# torch.cuda.get_device_capability at import and peft imports bitsandbytes, so workers
# import them after the fork.
WORKER_PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "safetensors.torch",
    "service.worker.client",
    "service.loader.footprint",
    "tests.common.handles.host_segments",
    "gpu_check_worker",
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=int, default=120)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
    parser.add_argument("--rehearse-on-cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a ~3M-param Llama (for tests)")
    parser.add_argument("--stages", help="only these stages (comma-separated), to rerun some")
    args = parser.parse_args()
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import torch

    where = "cpu" if args.rehearse_on_cpu else "cuda:0"
    if where != "cpu" and not torch.cuda.is_available():
        print(
            "gpu_check needs a CUDA GPU; this machine has none (--rehearse-on-cpu runs the "
            "same flow on CPU)",
            file=sys.stderr,
        )
        return 2
    from gpu_check_basics import loader_template, versions, worker_template
    from gpu_check_models import (
        Setup,
        attach_time,
        checkpoints,
        forced_unload,
        four_workers,
        load,
        placement_peak,
        server,
    )
    from gpu_check_runner import Runner, Stage
    from gpu_check_segments import (
        freed_after_last_fd,
        import_as,
        read_only,
        survives_loader_exit,
        vmm_export,
    )
    from gpu_check_worker import start_template

    runner = Runner.from_env(args.budget)
    from common import ROOT

    start_template(WORKER_PRELOAD, [str(ROOT), str(BENCH)])  # its imports overlap the first stages
    work = Path(tempfile.mkdtemp(prefix="basehold-gpu-check-"))
    setup = Setup(where, work, args.params_m, args.tiny, args.steps)
    exported = ("vmm-export",)
    served = ("checkpoints", "server")
    stages = [
        Stage("versions", versions(where), seconds=60),
        Stage("loader-template-cuda-free", loader_template, seconds=120, at_least=10),
        Stage("worker-template-cuda-free", worker_template(WORKER_PRELOAD), seconds=120),
        Stage("vmm-export", vmm_export(where), seconds=60, at_least=5),
        Stage("survives-loader-exit", survives_loader_exit, exported, seconds=30),
        Stage("import-same-uid", import_as("same"), exported, seconds=60),
        Stage("import-other-uid", import_as("other-uid"), exported, seconds=60),
        Stage("import-pid-namespace", import_as("pid-namespace"), exported, seconds=60),
        Stage("read-only", read_only, exported, seconds=60),
        Stage("freed-after-last-fd", freed_after_last_fd, exported, seconds=30),
        Stage("checkpoints", checkpoints(setup), seconds=120, at_least=5),
        Stage("server", server(setup), ("checkpoints",), seconds=120, at_least=5),
        *(
            Stage(f"load-{kind}", load(setup, kind), served, seconds=180, at_least=10)
            for kind in ("fp32", "bf16", "nf4", "int8")
        ),
        Stage("placement-peak", placement_peak(setup), (*served, "load-bf16"), seconds=120),
        Stage("attach-time", attach_time(setup), ("load-bf16",), seconds=120, at_least=5),
        Stage("four-workers", four_workers(setup), ("load-bf16",), seconds=120, at_least=5),
        Stage("forced-unload", forced_unload(setup), served, seconds=120, at_least=10),
    ]
    try:
        chosen = set(args.stages.split(",")) if args.stages else None
        for stage in stages:
            runner.run(stage, chosen)
    finally:
        setup.stop()
    return runner.summary()


if __name__ == "__main__":
    sys.exit(main())

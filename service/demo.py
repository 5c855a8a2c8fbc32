"""A small generated checkpoint, so a newcomer with no hub access has something real to load:
a randomly initialised Llama with a real tokenizer (a byte-level BPE trained here, offline,
on text shipped with the package) and a generation config, so the README's worker flow
(`client.tokenizer`, `client.attach`, TRL's `SFTTrainer`) runs on it unchanged."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger("basehold")
# The writer's output goes to the server's log: no progress bars there (a caller's own
# setting wins).
_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}

DEMO_NAME = "demo-llama"
VOCAB = 4096
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def demo_tokenizer() -> Any:
    """A byte-level BPE trained on the bundled corpus (deterministic, a fraction of a
    second), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("service.demo_data").joinpath("corpus.txt").read_text("utf-8")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=512, padding_side="right", **SPECIAL
    )


def written(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "tokenizer.json").is_file()


def write_demo_checkpoint(root: Path, name: str = DEMO_NAME) -> Path:
    """Write (once) a randomly initialised ~4M-parameter Llama under `root/name`, with its
    tokenizer and generation config (added to a demo folder written before they were).
    A new one is written beside it and renamed into place: a write stopped midway (the
    service stopped while `serve --demo` wrote it) leaves no half checkpoint under `name`."""
    target = root / name
    if written(target):
        return target
    if target.exists():
        _fill(target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-partial-", dir=root))
    try:
        _fill(partial)
        os.rename(partial, target)
    except OSError:
        if not written(target):  # not another writer that finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _fill(target: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = demo_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if not (target / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
        LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    generation = GenerationConfig(
        **ids, max_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.95
    )
    generation.save_pretrained(target)


class DemoWriter:
    """`serve --demo` on the serving side: the checkpoint is written by a child process
    (torch and transformers stay out of the serving process) once the server answers, so
    /healthz does not wait for it. The app holds it as `app.state.demo`: /readyz answers
    503 `demo_preparing` with `detail` while `preparing`. `on_written` runs (in the
    writer's thread) once the checkpoint is there, before `preparing` turns false."""

    def __init__(self, target: Path, on_written: Callable[[], None]) -> None:
        self.target = target
        self.preparing = not written(target)
        self.failed = False
        self.detail = (
            f"The demo checkpoint (serve --demo) is being written to {target}; retry "
            "shortly (seconds to a minute)."
        )
        self._on_written = on_written
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self) -> None:
        threading.Thread(target=self._write, name="demo-writer", daemon=True).start()

    def _write(self) -> None:
        ended = "it exited with code 0"
        if not written(self.target):
            command = [sys.executable, "-m", "service.demo", str(self.target.parent)]
            with self._lock:
                if self._stopped:
                    return
                try:
                    self._process = subprocess.Popen(
                        command, stdout=subprocess.DEVNULL, env=_QUIET | dict(os.environ)
                    )
                except OSError as exc:
                    self._process, ended = None, f"it did not start: {exc}"
            if self._process is not None:
                ended = f"it exited with code {self._process.wait()}"
        if written(self.target):
            self._on_written()
        elif not self._stopped:
            self.failed = True
            log.error(
                "writing the demo checkpoint to %s failed (%s; see the lines above); the "
                "service runs without it",
                self.target,
                ended,
            )
        self.preparing = False

    def stop(self) -> None:
        """At exit: a write still under way is stopped (it leaves nothing under the name)."""
        with self._lock:
            self._stopped = True
            process = self._process
        if process is None or process.poll() is not None:
            return
        # SIGTERM: before the writer starts writing it just ends (nothing to say, nothing
        # written); once writing, its handler unwinds and the half-written folder goes.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds the write: its half-written folder is removed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        print(write_demo_checkpoint(Path(sys.argv[1])))
    except KeyboardInterrupt:  # DemoWriter.stop: the service stops, nothing to report
        sys.exit(130)

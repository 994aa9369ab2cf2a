#!/usr/bin/env python3
"""The micro-batch probe, run inside the TRAINING env by the worker before a run: which split of an
optimizer step (per_device_train_batch_size × gradient_accumulation_steps) fills this GPU.

Usage (with the training env's python; one process, the model loaded once):
    python workers/envscripts/batch_probe.py REQUEST.json RESULT.json
    REQUEST.json: {"args": {...train.yaml...}, "step": 12, "margin": 0.1, "timed_steps": 2,
                   "warmup_steps": 1, "device": "auto", "memory_limit_mib": null}

It loads the model the way `llamafactory-cli train` does, with the run's own arguments (LoRA, Liger,
gradient checkpointing, precision, attention): LLaMA-Factory's get_train_args, load_tokenizer,
get_template_and_fix_tokenizer, load_model, its data collator and its trainer (CustomSeq2SeqTrainer:
the same loss, optimizer and mixed precision). Then, for micro-batches 1, 2, 4, … up to the step size
(workers/envscripts/microbatch.py plans them), it runs warm-up and timed training steps on synthetic
full-length sequences (cutoff_len + 1 tokens when packing, as LLaMA-Factory packs them) and records
the peak memory (torch's counters, reset before each size; the process's peak RSS on a CPU) and the
time of forward + backward and of the optimizer step. It stops at the first size that runs out of
memory or would pass the memory budget. Last, at the split the panel will choose from these
measurements, it runs LLaMA-Factory's trainer loop itself for a few optimizer steps (`loop_step_s` on
that size's measurement): what a run's step costs beyond the passes timed alone.

Writes one JSON object to RESULT.json: {"ok", "device", "total_mib", "overhead_mib", "base_mib",
"seq_len", "measurements": [...], "load_s", "probe_s", "versions", "error"}; prints progress lines.
Standalone on purpose: imports nothing from app/ (microbatch.py is standard-library arithmetic).
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import microbatch  # noqa: E402

STARTED = time.monotonic()
MIB = 1024 * 1024
# The trainer loop: steps left out of its timing (data loader workers starting, the first step), and
# about how long the timed steps should take, in at least / at most this many steps.
LOOP_WARMUP_STEPS = 2
LOOP_TARGET_S = 4.0
LOOP_MIN_STEPS, LOOP_MAX_STEPS = 3, 16
# Distinct synthetic rows the loop's data repeats.
LOOP_ROWS = 64


def say(message: str) -> None:
    print(f"probe [{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- memory counters
class Device:
    def __init__(self, torch: Any, cuda: bool) -> None:
        self.torch, self.cuda = torch, cuda

    @property
    def name(self) -> str:
        return self.torch.cuda.get_device_name(0) if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak(self) -> tuple[float, float]:
        """(allocated, reserved) peak in MiB since the last reset."""
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / MIB, self.torch.cuda.max_memory_reserved() / MIB
        rss = _status_kib("VmHWM") / 1024
        return rss, rss

    def allocated(self) -> float:
        return self.torch.cuda.memory_allocated() / MIB if self.cuda else _status_kib("VmRSS") / 1024

    def totals(self) -> tuple[float, float]:
        """(total, overhead) in MiB: the device's memory, and what of it is not this process's
        PyTorch allocator (the CUDA context, other processes)."""
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info()
            used = total - free
            return total / MIB, max(0.0, used / MIB - self.torch.cuda.memory_reserved() / MIB)
        return _meminfo_kib("MemTotal") / 1024, 0.0


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


def _meminfo_kib(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "OutOfMemoryError" in text or "out of memory" in text or "can't allocate memory" in text


class RepeatedRows:
    """A map-style dataset of `length` rows cycling through a few synthetic ones (the loop's data)."""

    def __init__(self, rows: list[dict[str, Any]], length: int) -> None:
        self.rows, self.length = rows, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index % len(self.rows)]


# --------------------------------------------------------------------------- the probe
def probe(request: dict[str, Any]) -> dict[str, Any]:
    args = dict(request["args"])
    step = int(request["step"])
    margin = float(request.get("margin", 0.1))
    timed_steps = max(1, int(request.get("timed_steps", 2)))
    warmup_steps = max(0, int(request.get("warmup_steps", 1)))
    workdir = tempfile.mkdtemp(prefix="tuneboard-probe-")
    # One process, one device, training steps only (no evaluation, nothing saved): the run's own
    # arguments otherwise.
    for key in ("resume_from_checkpoint", "deepspeed", "eval_dataset", "eval_steps"):
        args.pop(key, None)
    args.update(output_dir=workdir, overwrite_output_dir=True, per_device_train_batch_size=1,
                gradient_accumulation_steps=1, report_to="none", do_train=True, do_eval=False, do_predict=False,
                eval_strategy="no", val_size=0.0, load_best_model_at_end=False, save_strategy="no")

    import torch
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    cuda = torch.cuda.is_available() and request.get("device", "auto") != "cpu"
    device = Device(torch, cuda)
    say(f"imports done; device {device.name}")
    model_args, data_args, training_args, finetuning_args, _generating = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template, model=model, pad_to_multiple_of=8,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        block_diag_attn=model_args.block_diag_attn, neat_packing=data_args.neat_packing,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        compute_dtype=model_args.compute_dtype, **tokenizer_module,
    )
    trainer = CustomSeq2SeqTrainer(model=model, args=training_args, finetuning_args=finetuning_args,
                                   data_collator=collator, **tokenizer_module)
    trainer.create_optimizer()
    wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1
    load_s = time.monotonic() - STARTED
    device.sync()
    base_mib = device.allocated()
    total_mib, overhead_start = device.totals()
    if request.get("memory_limit_mib"):
        total_mib, overhead_start = float(request["memory_limit_mib"]), 0.0
    # With packing LLaMA-Factory lowers cutoff_len by one and pads each pack to cutoff_len + 1, the
    # config's cutoff_len; unpacked, the longest row is cutoff_len.
    packing = bool(data_args.packing or data_args.neat_packing)
    seq_len = data_args.cutoff_len + 1 if packing else data_args.cutoff_len
    say(f"model loaded in {load_s:.1f}s: {base_mib:.0f} MiB; {total_mib:.0f} MiB on {device.name}; "
        f"sequences of {seq_len} tokens, step {step}")
    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)

    def batch_of(micro: int) -> dict[str, Any]:
        ids = torch.randint(0, vocab, (micro, seq_len), generator=generator).tolist()
        return collator([{"input_ids": row, "attention_mask": [1] * seq_len, "labels": row} for row in ids])

    def optimizer_step() -> None:
        if training_args.max_grad_norm and training_args.max_grad_norm > 0:
            trainer._clip_grad_norm(wrapped)
        trainer.optimizer.step()
        wrapped.zero_grad()

    def one_step(inputs: dict[str, Any], passes: int = 1) -> tuple[float, float]:
        """`passes` forward+backward passes back to back, as gradient accumulation runs them (no
        synchronisation between them: the host queues the next pass while the device runs this
        one), then the optimizer step. (seconds per pass, seconds of the optimizer step)"""
        device.sync()
        start = time.perf_counter()
        for _ in range(passes):
            trainer.training_step(wrapped, inputs, None)
        device.sync()
        middle = time.perf_counter()
        optimizer_step()
        device.sync()
        return (middle - start) / passes, time.perf_counter() - middle

    def trainer_loop(micro: int, accumulation: int, passes_step_s: float) -> tuple[float, int]:
        """Seconds per optimizer step of LLaMA-Factory's trainer (the run's arguments, its LogCallback,
        its data loader) on synthetic full-length sequences at this split, after the warm-up steps;
        and the steps timed."""
        from llamafactory.train.callbacks import LogCallback
        from transformers import PrinterCallback, TrainerCallback
        from transformers.utils import logging as transformers_logging

        timed = max(LOOP_MIN_STEPS, min(LOOP_MAX_STEPS, math.ceil(LOOP_TARGET_S / max(passes_step_s, 1e-3))))
        ends: list[float] = []

        class StepEnds(TrainerCallback):
            def on_step_end(self, *_args: Any, **_kwargs: Any) -> None:
                ends.append(time.perf_counter())

        loop_args = copy.copy(training_args)
        loop_args.per_device_train_batch_size, loop_args.gradient_accumulation_steps = micro, accumulation
        loop_args.max_steps, loop_args.disable_tqdm = LOOP_WARMUP_STEPS + timed, True
        ids = torch.randint(0, vocab, (LOOP_ROWS, seq_len), generator=generator).tolist()
        rows = RepeatedRows([{"input_ids": row, "attention_mask": [1] * seq_len, "labels": row} for row in ids],
                            loop_args.max_steps * micro * accumulation)
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_warning()  # the trainer's banners would land in the run's log
        try:
            loop = CustomSeq2SeqTrainer(model=model, args=loop_args, finetuning_args=finetuning_args,
                                        data_collator=collator, train_dataset=rows,
                                        callbacks=[LogCallback(), StepEnds()], **tokenizer_module)
            loop.remove_callback(PrinterCallback)  # and its per-step lines
            loop.train()
        finally:
            transformers_logging.set_verbosity(verbosity)
        device.sync()
        steps = len(ends) - LOOP_WARMUP_STEPS
        return (ends[-1] - ends[LOOP_WARMUP_STEPS - 1]) / steps, steps

    measurements: list[dict[str, Any]] = []
    budget = microbatch.memory_budget_mib(total_mib, overhead_start, margin)
    while (micro := microbatch.plan_next(measurements, step, budget, base_mib)) is not None:
        device.reset()
        error: BaseException | None = None
        times: list[tuple[float, float]] = []
        try:
            inputs = batch_of(micro)
            for _ in range(warmup_steps):
                one_step(inputs)
            times.append(one_step(inputs, timed_steps))
            times.append(one_step(inputs))  # one pass alone: how much a synchronisation costs (diagnostic)
            del inputs
        except Exception as caught:  # noqa: BLE001 - an out-of-memory error ends the probe, others too
            error = caught
        if error is not None:
            oom = is_oom(error)
            measurements.append({"micro": micro, "ok": False,
                                 "error": "out of memory" if oom else f"{type(error).__name__}: {error}"[:500]})
            say(f"micro-batch {micro}: {'out of memory' if oom else 'failed: ' + repr(error)[:300]}")
            error = None  # drop the traceback's frames (and their tensors) before the next size
            wrapped.zero_grad(set_to_none=True)
            device.reset()
            if not oom:
                break
            continue
        allocated, reserved = device.peak()
        fb_s, opt_s = times[0]
        measurements.append({"micro": micro, "ok": True, "peak_allocated_mib": round(allocated, 1),
                             "peak_reserved_mib": round(reserved, 1), "fb_s": round(fb_s, 5),
                             "opt_s": round(opt_s, 5), "steps": timed_steps,
                             "single_pass_s": round(times[1][0], 5)})
        say(f"micro-batch {micro}: {reserved:.0f} MiB reserved ({allocated:.0f} allocated), "
            f"{fb_s * 1000:.1f} ms forward+backward ({times[1][0] * 1000:.1f} ms as a pass alone), "
            f"{opt_s * 1000:.1f} ms optimizer step, "
            f"{micro * seq_len / fb_s:,.0f} tokens/s")
    # The trainer's own loop at the split the panel will choose (microbatch.choose on the same
    # measurements). A run's optimizer step costs more than its passes timed alone: the data loader,
    # the token count and loss check after every micro-batch (each waits for the device), logging, the
    # scheduler. On a host-bound model that is a large share: on an H200 the 0.5B shape's passes took
    # 0.14 s and its runs' steps 0.19–0.22 s.
    chosen = microbatch.choose(measurements, step, budget, seq_len)
    measured = next((m for m in measurements if m.get("ok") and m["micro"] == chosen["micro"]), None)
    if measured is not None:
        # The passes' optimizer state and gradients go first: the loop makes its own.
        wrapped.zero_grad(set_to_none=True)
        trainer.accelerator.free_memory()
        trainer.optimizer = trainer.lr_scheduler = None
        device.reset()
        try:
            loop_s, loop_steps = trainer_loop(chosen["micro"], chosen["accumulation"], chosen["step_s"])
        except Exception as failure:  # noqa: BLE001 - the passes' measurements stand without it
            say(f"trainer loop at {chosen['micro']} × {chosen['accumulation']} failed: {failure!r}"[:500])
        else:
            measured.update(loop_step_s=round(loop_s, 5), loop_accumulation=chosen["accumulation"],
                            loop_steps=loop_steps)
            say(f"trainer loop at {chosen['micro']} × {chosen['accumulation']}: {loop_s * 1000:.1f} ms per optimizer "
                f"step over {loop_steps} steps (the passes alone: {chosen['step_s'] * 1000:.1f} ms, "
                f"× {loop_s / chosen['step_s']:.2f})")
    _, overhead_mib = device.totals()
    return {
        "ok": any(m["ok"] for m in measurements), "device": device.name, "total_mib": round(total_mib, 1),
        "overhead_mib": round(overhead_mib, 1), "base_mib": round(base_mib, 1), "seq_len": seq_len,
        "step": step, "margin": margin, "measurements": measurements, "load_s": round(load_s, 2),
        "probe_s": round(time.monotonic() - STARTED, 2), "versions": _versions(torch),
        "liger": bool(model_args.enable_liger_kernel), "error": None,
    }


def _versions(torch: Any) -> dict[str, str]:
    from importlib import metadata

    found = {"torch": torch.__version__}
    for name in ("llamafactory", "transformers", "peft", "liger-kernel"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    request = json.loads(Path(argv[1]).read_text())
    if request.get("device") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        result = probe(request)
    except Exception as error:  # noqa: BLE001 - reported to the panel, which keeps the config's split
        traceback.print_exc()
        result = {"ok": False, "measurements": [], "error": f"{type(error).__name__}: {error}"[-2000:],
                  "probe_s": round(time.monotonic() - STARTED, 2)}
    Path(argv[2]).write_text(json.dumps(result))
    say("done" if result["ok"] else f"failed: {result.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

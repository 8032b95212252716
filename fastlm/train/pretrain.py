"""`fastlm pretrain`: the training loop shared by BERT (MLM + NSP), GPT (causal LM) and T5 (span corruption).

Reproducibility: the batch of step s is drawn from generators seeded by (seed, s) — an epoch permutation for
the data order, a per-step generator for masking / span corruption, and torch's global seed for dropout — so a
run resumed from a checkpoint (model, AdamW and schedule state) repeats no step and loses none, bit-identically
on the CPU. Under torchrun each rank takes its slice of the same global batch, so N ranks with batch B match
one process with batch N * B.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
from torch import distributed as dist

from .._optional import require
from ..data import load_texts, load_tokenizer, train_tokenizer
from ..data.tokenizers import min_vocab_size
from .checkpoint import latest_checkpoint, load_newest_good, prune_checkpoints, save_checkpoint
from .plot import plot_history
from .tasks import finish_metrics, get_task
from .validate import TrainingError, check_float, check_int, check_out, clear_out, flag

__all__ = ["PretrainConfig", "pretrain"]


@dataclasses.dataclass
class PretrainConfig:
    """Everything a pretraining run depends on (``fastlm pretrain --help`` documents each field)."""

    family: str
    out: str
    preset: str = "tiny"
    data: str = "builtin"
    tokenizer: str | None = None  # a folder with tokenizer.json; default: train one on the data
    vocab_size: int = 4096
    tokenizer_chars: int = 500_000
    max_chars: int | None = 1_000_000
    seq_len: int = 128
    pack_documents: bool = False
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    dropout: float = 0.0  # short runs on small data: no dropout; negative: the preset's rates
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int | None = None  # default: eval_every
    keep: int = 2
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    progress: bool = True


def _lr_factor(step, warmup, total, min_ratio):
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _epoch_order(n, seed, epoch):
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g)


def _global_indices(step, size, n, seed):
    """Example indices of the global batch of ``step``: the next ``size`` entries of the epoch permutations."""
    start = step * size
    out = []
    while len(out) < size:
        epoch, offset = divmod(start + len(out), n)
        out.extend(_epoch_order(n, seed, epoch)[offset : offset + size - len(out)].tolist())
    return torch.tensor(out)


def _step_generator(device, seed, step, salt):
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 31 + salt) % (2**63))


class _Dist:
    """torchrun's environment: rank, world size and the process group (gloo on the CPU, nccl on GPUs).

    On a GPU the rank's device (``device``, LOCAL_RANK's by default) becomes the current CUDA device before the
    process group starts, and NCCL is told that device, so that no rank creates contexts or launches on cuda:0.
    """

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.on = self.world > 1
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device.index)
        if self.on and not dist.is_initialized():
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)  # every supported torch (>= 2.11) takes device_id
            else:
                dist.init_process_group("gloo")

    def wrap(self, model):
        """``model`` under DistributedDataParallel when there are several ranks, else ``model`` itself."""
        if not self.on:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def micro_step(self, trained, last):
        """The context of one gradient-accumulation micro-step: DDP all-reduces gradients only on the last
        one (``no_sync`` on the others keeps their gradients local, to be summed into the last one's)."""
        if self.on and not last:
            return trained.no_sync()
        return contextlib.nullcontext()

    def mean(self, value):
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self):
        if self.on:
            dist.barrier()


def _device(config):
    """--device, else LOCAL_RANK's GPU (torchrun starts one process per GPU), else the CPU. A bare "cuda" also
    means LOCAL_RANK's GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device:
        device = torch.device(config.device)
        return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _tokenizer(config, docs, run):
    """Load --tokenizer, or the run's own (resume), or train one on the data (rank 0; the others load it)."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer, config.family)
    own = os.path.join(config.out, "tokenizer")
    if config.resume:
        if not os.path.isfile(os.path.join(own, "tokenizer.json")):
            raise ValueError(f"--resume: {own!r} holds no tokenizer.json; is {config.out!r} a pretraining run?")
    else:
        if run.is_main:
            sample, total = [], 0
            for d in docs:
                if total >= config.tokenizer_chars:
                    break
                sample.append(d)
                total += len(d)
            train_tokenizer(config.family, sample, config.vocab_size).save(own)
        run.ddp.barrier()
    return load_tokenizer(own, config.family)


def _check_config(config):
    """ValueError naming the first flag of ``config`` out of its range."""
    get_task(config.family, config.pack_documents)
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "keep", "tokenizer_chars"):
        check_int(name, getattr(config, name), 1)
    check_int("seq_len", config.seq_len, 2)
    check_int("vocab_size", config.vocab_size, min_vocab_size(config.family))
    check_int("max_chars", config.max_chars, 1, optional=True)
    check_int("save_every", config.save_every, 1, optional=True)
    check_int("warmup", config.warmup, 0, optional=True)
    check_int("seed", config.seed, 0, 2**32 - 1)
    check_float("lr", config.lr, 0, lo_open=True)
    check_float("weight_decay", config.weight_decay, 0)
    check_float("min_lr_ratio", config.min_lr_ratio, 0, 1)
    check_float("clip", config.clip, 0)
    check_float("dropout", config.dropout, hi=1, hi_open=True)


# What a resumed run must share with its checkpoint: its examples, batches, tokenizer and model follow from
# these, so a change would silently make a different run.
FIXED_ON_RESUME = (
    "family", "preset", "data", "max_chars", "tokenizer", "vocab_size", "tokenizer_chars", "seq_len",
    "pack_documents", "batch_size", "grad_accum", "eval_batches", "dropout", "seed",
)  # fmt: skip
# What a resumed run may change; applied from the checkpoint's step on (the schedule is recomputed with them).
APPLIED_ON_RESUME = (
    "steps", "lr", "weight_decay", "warmup", "min_lr_ratio", "clip", "eval_every", "save_every", "keep",
)  # fmt: skip


def _check_resume(config, saved, world, path):
    """The changes of ``config`` against the run config ``saved`` in the checkpoint at ``path`` that resume
    applies, as a list of "--flag old -> new"; ValueError naming the flags whose change breaks exactness."""
    now = dataclasses.asdict(config)
    saved = {**saved, "world": saved.get("world", world)}  # checkpoints before the world size was recorded
    now["world"] = world
    broken = [k for k in (*FIXED_ON_RESUME, "world") if k in saved and saved[k] != now[k]]
    if broken:
        changes = ", ".join(f"{'ranks' if k == 'world' else flag(k)} ({saved[k]!r} -> {now[k]!r})" for k in broken)
        raise ValueError(
            f"--resume: cannot change {changes}: the run in {path!r} was made with the saved values, which fix "
            f"its data, batches, tokenizer and model; pass them, or start a new run in another --out"
        )
    return [f"{flag(k)} {saved[k]!r} -> {now[k]!r}" for k in APPLIED_ON_RESUME if k in saved and saved[k] != now[k]]


@dataclasses.dataclass
class _Run:
    """The state of a run that its steps share: the set-up, the data, the model and optimizer, the history."""

    config: PretrainConfig
    task: object
    device: torch.device
    ddp: _Dist
    ckpt_dir: str
    resumed: tuple | None = None  # (path, state) of the checkpoint resumed from
    tokenizer: object = None
    model_config: object = None
    train: dict = None
    held_out: dict = None
    model: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    history: dict = dataclasses.field(default_factory=lambda: {"step": [], "loss": [], "eval": []})
    start: int = 0

    @property
    def is_main(self):
        return self.ddp.rank == 0

    def say(self, message):
        """Print ``message`` to stderr on rank 0."""
        if self.is_main:
            print(f"fastlm pretrain: {message}", file=sys.stderr, flush=True)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)


def _set_up(config):
    """Check ``config``, start the ranks and make --out ready (refused when used, unless --resume or
    --overwrite); then, with --resume, load the newest readable checkpoint and check the config against it."""
    _check_config(config)
    device = _device(config)
    ddp = _Dist(device)
    task = get_task(config.family, config.pack_documents)
    run = _Run(config, task, device, ddp, os.path.join(config.out, "checkpoints"))
    check_out(config.out, resume=config.resume, overwrite=config.overwrite)
    ddp.barrier()  # every rank has seen --out as it was before rank 0 clears it
    if run.is_main and not config.resume:
        clear_out(config.out)
    ddp.barrier()
    if config.resume:
        path, state = load_newest_good(run.ckpt_dir, say=run.say)
        if state["step"] > config.steps:
            raise ValueError(f"--steps {config.steps} is below the step {state['step']} of {path!r}")
        applied = _check_resume(config, state.get("run", {}), ddp.world, path)
        run.say(f"resuming from {path!r} at step {state['step']}")
        if applied:
            run.say("applying the changed " + ", ".join(applied))
        run.resumed = (path, state)
    return run


def _load_data(run):
    """The tokenizer, the model config and the train / held-out examples of ``run``."""
    config, task = run.config, run.task
    docs = load_texts(config.data, max_chars=config.max_chars)
    run.tokenizer = _tokenizer(config, docs, run)
    run.model_config = task.config(config.preset, run.tokenizer, config.dropout)
    if run.resumed is not None:
        path, state = run.resumed
        saved, now = state["model_config"], dataclasses.asdict(run.model_config)
        if saved != now:
            diff = {k: (v, saved.get(k)) for k, v in now.items() if saved.get(k) != v}
            raise ValueError(f"checkpoint {path!r} does not fit --preset {config.preset}: (now, saved) {diff}")
    run.tokenizer.check_fits(run.model_config.vocab_size)
    limit = task.max_seq_len(run.model_config)
    if limit is not None and config.seq_len > limit:
        raise ValueError(
            f"--seq-len must be at most {limit} (the positions of --preset {config.preset}), got {config.seq_len}"
        )

    token_docs = run.tokenizer.encode_batch(docs)
    examples = task.examples(token_docs, run.tokenizer, config.seq_len, torch.Generator().manual_seed(config.seed))
    n = next(iter(examples.values())).shape[0]
    n_eval = max(1, min(n // 20, config.eval_batches * _global_batch(run)))  # one split for any ranks x accumulation
    if n - n_eval < 1:
        raise ValueError(f"data {config.data!r} gives {n} examples of {config.seq_len} tokens: too few to train")
    run.train = {k: v[n_eval:] for k, v in examples.items()}
    run.held_out = {k: v[:n_eval] for k, v in examples.items()}


def _global_batch(run):
    return run.config.batch_size * run.ddp.world * run.config.grad_accum


def _schedule(config):
    """The learning-rate factor of each step: linear warmup, then cosine decay (``_lr_factor``)."""
    warmup = config.warmup if config.warmup is not None else max(1, min(100, config.steps // 10))
    return lambda s: _lr_factor(s, warmup, config.steps, config.min_lr_ratio)


def _build_model(run):
    """The model, AdamW and the schedule of ``run``, seeded by --seed, with a resumed run's state loaded."""
    config = run.config
    torch.manual_seed(config.seed)
    run.model = model = run.task.model_class(run.model_config).to(run.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    run.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=True,  # one kernel per step instead of a dozen ops per tensor
    )
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, _schedule(config))
    if run.resumed is not None:
        _load_state(run, *run.resumed)


def _load_state(run, path, state):
    """Load the checkpoint ``state`` into the run, then apply the current --lr, --weight-decay and schedule
    flags (a checkpoint's optimizer state carries the old ones)."""
    config = run.config
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path!r} does not fit the model: {e}") from None
    run.scheduler.load_state_dict(state["scheduler"])
    run.history, run.start = state["history"], state["step"]
    factor = _schedule(config)(run.start)
    run.scheduler.base_lrs = [config.lr] * len(run.optimizer.param_groups)
    for group, decay in zip(run.optimizer.param_groups, (config.weight_decay, 0.0), strict=True):
        group.update(initial_lr=config.lr, lr=config.lr * factor, weight_decay=decay)


def _train_step(run, trained, step):
    """One optimizer step on the global batch of ``step``; returns its loss (the mean over ranks).
    TrainingError when the loss is not finite (nothing is updated then)."""
    config, ddp, task = run.config, run.ddp, run.task
    idx = _global_indices(step, _global_batch(run), next(iter(run.train.values())).shape[0], config.seed)
    generator = _step_generator(run.device, config.seed, step, 1)
    batch = task.batch({k: v[idx] for k, v in run.train.items()}, run.tokenizer, generator, run.device)
    torch.manual_seed(config.seed * 1_000_003 + step * ddp.world + ddp.rank)  # dropout
    B, accum = config.batch_size, config.grad_accum
    total = 0.0
    for m in range(accum):
        lo = (m * ddp.world + ddp.rank) * B
        micro = {k: v[lo : lo + B] for k, v in batch.items()}
        with ddp.micro_step(trained, last=m == accum - 1):
            with run.autocast():
                loss = trained(**micro).loss / accum
            loss.backward()
        total += float(loss.detach())
    total = ddp.mean(total)
    if not math.isfinite(total):
        newest = latest_checkpoint(run.ckpt_dir)
        kept = f"the newest checkpoint is {newest!r}" if newest else "no checkpoint was written"
        raise TrainingError(
            f"the loss became {total} at step {step + 1} (lr {run.scheduler.get_last_lr()[0]:.3g}); stopped: {kept}. "
            f"A lower --lr, a --clip or more --warmup steps may help"
        )
    if config.clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total


def _checkpoint(run, done):
    """Save the run's state as of ``done`` steps (rank 0) and prune the old checkpoints."""
    state = {
        "step": done,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "history": run.history,
        "model_config": dataclasses.asdict(run.model_config),
        "run": {**dataclasses.asdict(run.config), "world": run.ddp.world},
    }
    save_checkpoint(state, run.ckpt_dir, done)
    prune_checkpoints(run.ckpt_dir, run.config.keep)


def _loop(run):
    """Steps ``run.start`` .. --steps: train, evaluate every --eval-every steps, checkpoint every --save-every."""
    config = run.config
    trained = run.ddp.wrap(run.model)
    save_every = config.save_every or config.eval_every
    tokens_per_step = _global_batch(run) * run.task.tokens_per_example(run.train)
    bar = None
    if run.is_main and config.progress:
        tqdm = require("tqdm", "train", "the progress bar of fastlm pretrain").tqdm
        bar = tqdm(total=config.steps, initial=run.start, desc=f"pretrain {config.family}", unit="step")
    t0 = time.perf_counter()
    run.model.train()
    try:
        for step in range(run.start, config.steps):
            total = _train_step(run, trained, step)
            run.history["step"].append(step + 1)
            run.history["loss"].append(total)
            if bar is not None:
                rate = (step + 1 - run.start) * tokens_per_step / (time.perf_counter() - t0)
                lr = run.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                metrics = evaluate(run.task, run.model, run.held_out, run.tokenizer, config, run.device, run.autocast())
                run.history["eval"].append({"step": done, **metrics})
                if bar is not None:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if run.is_main and (done % save_every == 0 or done == config.steps):
                _checkpoint(run, done)
    finally:
        if bar is not None:
            bar.close()


def _save_outputs(run):
    """OUT/model (HF format + tokenizer), OUT/history.json and OUT/loss.png (rank 0)."""
    config = run.config
    if run.is_main:
        run.model.save_pretrained(os.path.join(config.out, "model"))
        run.tokenizer.save(os.path.join(config.out, "model"))
        with open(os.path.join(config.out, "history.json"), "w") as f:
            json.dump(run.history, f)
        plot_history(run.history, os.path.join(config.out, "loss.png"), title=f"{config.family} {config.preset}")
    run.ddp.barrier()


def pretrain(config):
    """Run (or resume) pretraining as ``config`` says; returns the history dict (also in OUT/history.json).
    ValueError for a bad config, data or --out (nothing trained); TrainingError when the loss stops being
    finite or a checkpoint cannot be written."""
    run = _set_up(config)
    _load_data(run)
    _build_model(run)
    _loop(run)
    _save_outputs(run)
    return run.history


@torch.no_grad()
def evaluate(task, model, held_out, tokenizer, config, device, autocast):
    """The task's metrics on the held-out examples, with a fixed corruption (the same at every evaluation)."""
    model.eval()
    n = next(iter(held_out.values())).shape[0]
    sums = {}
    for lo in range(0, n, config.batch_size):
        rows = {k: v[lo : lo + config.batch_size] for k, v in held_out.items()}
        batch = task.batch(rows, tokenizer, _step_generator(device, config.seed, lo, 2), device)
        with autocast:
            part = task.evaluate(model, batch)
        for k, (num, count) in part.items():
            a, b = sums.get(k, (0.0, 0))
            sums[k] = (a + num, b + count)
    model.train()
    return finish_metrics(sums)

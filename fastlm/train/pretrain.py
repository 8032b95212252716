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
import time

import torch
from torch import distributed as dist

from .._optional import require
from ..data import load_texts, load_tokenizer, train_tokenizer
from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .plot import plot_history
from .tasks import finish_metrics, get_task

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


def _tokenizer(config, docs, is_main, ddp):
    """Load --tokenizer, or the run's own (resume), or train one on the data (rank 0; the others load it)."""
    if config.tokenizer:
        return load_tokenizer(config.tokenizer, config.family)
    own = os.path.join(config.out, "tokenizer")
    if not os.path.isfile(os.path.join(own, "tokenizer.json")):
        if config.resume:
            raise ValueError(f"--resume: {own!r} holds no tokenizer.json; is {config.out!r} a pretraining run?")
        if is_main:
            sample, total = [], 0
            for d in docs:
                if total >= config.tokenizer_chars:
                    break
                sample.append(d)
                total += len(d)
            train_tokenizer(config.family, sample, config.vocab_size).save(own)
        ddp.barrier()
    return load_tokenizer(own, config.family)


def _check_config(config):
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "keep"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.lr <= 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")


def pretrain(config):
    """Run (or resume) pretraining as ``config`` says; returns the history dict (also in OUT/history.json)."""
    _check_config(config)
    task = get_task(config.family)
    device = _device(config)
    ddp = _Dist(device)
    is_main = ddp.rank == 0
    ckpt_dir = os.path.join(config.out, "checkpoints")
    state = None
    if config.resume:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {ckpt_dir!r}")
        state = load_checkpoint(path)

    docs = load_texts(config.data, max_chars=config.max_chars)
    tokenizer = _tokenizer(config, docs, is_main, ddp)
    model_config = task.config(config.preset, tokenizer, config.dropout)
    if state is not None:
        saved = state["model_config"]
        if saved != dataclasses.asdict(model_config):
            diff = {k: (v, saved.get(k)) for k, v in dataclasses.asdict(model_config).items() if saved.get(k) != v}
            raise ValueError(f"checkpoint {path!r} does not fit --preset {config.preset}: (now, saved) {diff}")
    tokenizer.check_fits(model_config.vocab_size)

    token_docs = tokenizer.encode_batch(docs)
    examples = task.examples(token_docs, tokenizer, config.seq_len, torch.Generator().manual_seed(config.seed))
    n = next(iter(examples.values())).shape[0]
    global_batch = config.batch_size * ddp.world * config.grad_accum
    n_eval = max(1, min(n // 20, config.eval_batches * global_batch))  # one split for any ranks x accumulation
    if n - n_eval < 1:
        raise ValueError(f"data {config.data!r} gives {n} examples of {config.seq_len} tokens: too few to train")
    train = {k: v[n_eval:] for k, v in examples.items()}
    held_out = {k: v[:n_eval] for k, v in examples.items()}
    n_train = n - n_eval

    torch.manual_seed(config.seed)
    model = task.model_class(model_config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=True,  # one kernel per step instead of a dozen ops per tensor
    )
    warmup = config.warmup if config.warmup is not None else max(1, min(100, config.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, warmup, config.steps, config.min_lr_ratio)
    )
    history = {"step": [], "loss": [], "eval": []}
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {path!r} does not fit the model: {e}") from None
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["step"]
    trained = ddp.wrap(model)

    save_every = config.save_every or config.eval_every
    B, world, accum = config.batch_size, ddp.world, config.grad_accum
    tokens_per_step = global_batch * task.tokens_per_example(train)
    bar = None
    if is_main and config.progress:
        tqdm = require("tqdm", "train", "the progress bar of fastlm pretrain").tqdm
        bar = tqdm(total=config.steps, initial=start, desc=f"pretrain {config.family}", unit="step")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t0 = time.perf_counter()
    model.train()
    for step in range(start, config.steps):
        idx = _global_indices(step, global_batch, n_train, config.seed)
        batch = task.batch(
            {k: v[idx] for k, v in train.items()}, tokenizer, _step_generator(device, config.seed, step, 1), device
        )
        torch.manual_seed(config.seed * 1_000_003 + step * world + ddp.rank)  # dropout
        total = 0.0
        for m in range(accum):
            lo = (m * world + ddp.rank) * B
            micro = {k: v[lo : lo + B] for k, v in batch.items()}
            with ddp.micro_step(trained, last=m == accum - 1):
                with autocast:
                    loss = trained(**micro).loss / accum
                loss.backward()
            total += float(loss.detach())
        if config.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total = ddp.mean(total)
        history["step"].append(step + 1)
        history["loss"].append(total)
        if bar is not None:
            rate = (step + 1 - start) * tokens_per_step / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:,.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            metrics = evaluate(task, model, held_out, tokenizer, config, device, autocast)
            history["eval"].append({"step": done, **metrics})
            if bar is not None:
                bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if is_main and (done % save_every == 0 or done == config.steps):
            ckpt = {
                "step": done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "model_config": dataclasses.asdict(model_config),
                "run": dataclasses.asdict(config),
            }
            save_checkpoint(ckpt, ckpt_dir, done)
            prune_checkpoints(ckpt_dir, config.keep)
    if bar is not None:
        bar.close()
    if is_main:
        model.save_pretrained(os.path.join(config.out, "model"))
        tokenizer.save(os.path.join(config.out, "model"))
        with open(os.path.join(config.out, "history.json"), "w") as f:
            json.dump(history, f)
        plot_history(history, os.path.join(config.out, "loss.png"), title=f"{config.family} {config.preset}")
    ddp.barrier()
    return history


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

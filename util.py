"""Plumbing shared by train.py, pretrain.py, label.py and the rest: one error type for bad input,
atomic writes, JSON and checkpoint reading with one-line errors, torchrun set-up, AdamW groups,
the learning-rate schedule, resume checks, and the training loop of train.py and pretrain.py (Loop,
with its progress lines).
"""
import contextlib
import datetime
import io
import json
import math
import os
import pickle
import shlex
import signal
import struct
import sys
import tempfile
import time
import urllib.error
import warnings
import zipfile
from typing import NamedTuple

import torch
import torch.distributed as dist

import recipes


class InputError(ValueError):
    """Bad input, said in one line that names the file, key or box: the commands print it and exit."""


def fail(prog, e):
    """What a command does with an InputError: its one line, prefixed with the command, and exit status 1."""
    sys.exit(f"{prog}: {e}")


# ----------------------------------------------------------------------------------------------
# SIGINT (Ctrl-C) and SIGTERM: one line and exit status 128 + the signal, never a traceback.


class Interrupted(BaseException):
    """A SIGINT or SIGTERM where the command has no step boundary to stop at (its set-up, a save)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """SIGINT and SIGTERM for a command, as a context manager around its work. Outside a loop a signal
    raises Interrupted at once; inside one (after loop()) it is only noted, and the loop ends at its
    next step boundary when requested() says so, keeping that step's work. A second signal of the same
    kind raises at once (a second Ctrl-C); another kind is ignored (torchrun's SIGTERM after the
    terminal's SIGINT). On the way out: one line on stderr from rank 0, what is kept and the command
    that continues (said(): both, as a pair of strings), and exit status 128 + the signal (130, 143).
    DataLoader workers (forked) inherit the handler and ignore the signal: they end with the command."""

    def __init__(self, prog, said):
        self.prog, self.said = prog, said
        self.signum, self.looping, self.group, self.rank = None, False, None, 0

    def __enter__(self):
        self.pid = os.getpid()
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked worker: the command decides
            return
        if self.looping and self.signum is None:
            self.signum = signum
        elif self.signum in (None, signum):
            raise Interrupted(signum)

    def loop(self, d):
        """The loop starts: a signal now waits for requested(), which every rank of d answers alike (over
        a CPU group: no device sync), so that all stop after the same step."""
        self.looping, self.rank = True, d.rank
        if d.ddp:
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def requested(self):
        """The signal that asks the loop to stop (on any rank), else 0."""
        if self.group is None:
            return self.signum or 0
        t = torch.tensor([self.signum or 0])
        _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group), (t,))
        return int(t)

    def exit(self, signum, kept=None):
        """The line (kept: what the loop saved, instead of said()'s) and exit status 128 + signum."""
        said_kept, command = self.said()
        if self.rank == 0:
            print(f"{self.prog}: stopped by {signal.Signals(signum).name}: {kept or said_kept}; "
                  f"continue with: {command}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    def __exit__(self, kind, e, tb):
        for s, h in self.old.items():
            signal.signal(s, h)
        if isinstance(e, Interrupted):
            self.exit(e.signum)


def run_stop(prog, argv, last):
    """Stop for train.py and pretrain.py: with `last` (OUT/last.pt) on disk, the same command plus
    --resume continues (no arguments, the demo: --demo --resume); without, the same command again."""
    resume = command_line(argv or ["--demo"], "--resume")
    return Stop(prog, lambda: ((f"{last} as last saved", resume) if os.path.isfile(last)
                               else ("nothing saved", command_line(argv))))


def command_line(argv, flag=None, drop=()):
    """The command that ran, to be typed again: python FILE.py (or the installed mal-* command; under
    torchrun, torchrun with its process count) with argv, less the flags in drop, plus flag (valueless)
    when given. Those flags take no value or an optional one (--flag V, --flag=V), dropped with them."""
    out, i = [], 0
    while i < len(argv):
        a, i = argv[i], i + 1
        if a.split("=", 1)[0] in (*drop, flag):
            if "=" not in a and i < len(argv) and not argv[i].startswith("-"):
                i += 1  # its value
            continue
        out.append(a)
    prog = sys.argv[0]
    prog = ["python", prog] if prog.endswith(".py") else [os.path.basename(prog)]
    if "LOCAL_WORLD_SIZE" in os.environ:
        prog = ["torchrun", "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"], prog[-1]]
    return shlex.join(prog + out + ([flag] if flag else []))


# ----------------------------------------------------------------------------------------------
# Writing: a crash never leaves a half-written file.


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Open a temporary file next to `path`; on success it is flushed, synced and renamed onto
    `path` (atomic on POSIX), on failure removed: a crash never leaves a half-written `path`."""
    d = os.path.dirname(os.fspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would stick to the renamed file
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, payload):
    """Write bytes to `path` atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(payload)


def write_json(path, obj, **kw):
    """JSON to `path`, atomically; compact unless kw (json.dump's) say otherwise."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, **(kw or dict(separators=(",", ":"))))


def side_file(out, suffix):
    """labels.json -> labels<suffix> (e.g. labels.report.json): the files written beside a labels file."""
    return (out[:-5] if out.endswith(".json") else out) + suffix


# ----------------------------------------------------------------------------------------------
# Reading, with one-line errors.


def read_json(path, what="JSON file", keys=()):
    """The parsed file; InputError naming it when it is missing, not JSON, or (a dict) lacks any of `keys`."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: a folder, not a file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: not JSON (not even text)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: not valid JSON "
                         f"({e.msg} at line {e.lineno}, column {e.colno})") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        shape = "a dict" if isinstance(obj, dict) else f"a {type(obj).__name__}, not a dict"
        raise InputError(f"{what} {path}: no {' and no '.join(repr(k) for k in missing)} key ({shape})")
    return obj


_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                  "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "Untyped": 1}


class _StandIn(dict):
    """Takes whatever the pickle does to an object of a class it names, and does nothing."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *a, **k):
        return None

    def append(self, x):
        pass

    def extend(self, xs):
        pass


class _IndexReader(pickle.Unpickler):
    """Reads a checkpoint's index (its data.pkl) without running anything: every class is a stand-in,
    and the tensors' storages are only counted, in bytes."""

    def __init__(self, f):
        super().__init__(f)
        self.storage_bytes = 0

    def find_class(self, module, name):
        return type(name, (_StandIn,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            kind = getattr(pid[1], "__name__", "").removesuffix("Storage")
            self.storage_bytes += int(pid[4]) * _ELEMENT_BYTES.get(kind, 1)
        return None


def _truncation(path, size):
    """What a zip archive cut short still says: the tensor bytes its index (data.pkl, stored first)
    lists, or None where the cut falls inside the index itself."""
    with open(path, "rb") as f:
        head = f.read(min(size, 64 << 20))
    if len(head) < 30:
        return None
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = 30 + name_len + extra_len
    end = head.find(b"PK\x07\x08", start)  # the data descriptor after the index's bytes
    try:
        reader = _IndexReader(io.BytesIO(head[start:end]))
        reader.load()
    except Exception:
        return None
    return reader.storage_bytes


def load_checkpoint(path, what="checkpoint", mmap=False):
    """A torch.save file as a dict, weights only (torch.load(weights_only=True), on the CPU). Every
    failure is an InputError that says what the file is not: missing, not a PyTorch checkpoint,
    truncated, holding pickled code, not a dict."""
    if not os.path.exists(path):
        raise InputError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{what} {path}: a folder, not a checkpoint")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        listed = _truncation(path, size)
        raise InputError(f"{what} {path}: truncated: {size:,} bytes, " + (
            f"where its index lists {listed:,} bytes of tensors" if listed is not None else
            "cut inside its index") + " (an interrupted copy or save?)")
    if magic != b"PK\x03\x04" and magic[:2] != b"\x80\x02":  # torch.save's zip, or its legacy pickle format
        raise InputError(f"{what} {path}: not a PyTorch checkpoint (torch.save writes a zip archive; this "
                         f"file starts with {magic!r})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and magic == b"PK\x03\x04")
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise InputError(f"{what} {path}: holds pickled objects besides tensors and plain containers "
                             f"(code, or another program's classes); only weights are read") from None
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise InputError(f"{what} {path}: cannot be read as a PyTorch checkpoint ({first})") from None
    if not isinstance(ck, dict):
        raise InputError(f"{what} {path}: holds a {type(ck).__name__}, not a checkpoint's dict")
    return ck


def need_keys(ck, keys, path, what):
    """InputError naming the first of `keys` that the checkpoint dict lacks."""
    for k in keys:
        if k not in ck:
            raise InputError(f"{path}: not a {what} (no {k!r} key)")


# ----------------------------------------------------------------------------------------------
# torchrun


class Dist(NamedTuple):
    """Where this process stands: ddp (joined a process group of world > 1), its rank, the world size,
    its device."""
    ddp: bool
    rank: int
    world: int
    device: torch.device


def cuda_device(index):
    """cuda:index, made current; a one-line error where a node runs more ranks than it has GPUs (two
    ranks on one GPU would otherwise fail inside NCCL, or wait on each other)."""
    n = torch.cuda.device_count()
    if index >= n:
        raise InputError(f"cuda:{index} asked for, but this node has {n} CUDA device(s): start at most {n} "
                         f"process(es) per node (torchrun --nproc_per_node {max(n, 1)}) or run on the CPU")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def setup_distributed(device="auto", timeout_hours=2.0):
    """Dist from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), a single process without it.
    device: auto (CUDA if there is one), cpu, cuda (cuda:LOCAL_RANK) or cuda:N. With more than one
    rank this joins the process group (nccl on CUDA, gloo on CPU) with the given timeout: ranks wait
    that long for each other (rank 0 validating or merging) before giving up."""
    rank, world, local = (int(os.environ.get(k, d))
                          for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if device == "auto" else device)
    if device.type == "cuda":
        device = cuda_device(local if device.index is None else device.index)
    ddp = world > 1
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=timeout_hours),
                                device_id=device if device.type == "cuda" else None)
    return Dist(ddp, rank, world, device)


def barrier(d):
    if d.ddp:
        dist.barrier()


def _collective(run, tensors):
    """run() a collective on CPU tensors and return once gloo's worker threads have let go of them
    too. A worker drops its references just after the collective completes and needs the GIL for
    that; one that asks for it while the interpreter finalizes aborts the process ("terminate called
    without an active exception"), so a collective just before exit must not race the exit. While a
    worker holds a tensor, the tensor's Python object carries one more reference."""
    def refs():
        return [sys.getrefcount(t) for t in tensors]

    held = refs()
    run()
    deadline = time.time() + 5
    while any(now > then for now, then in zip(refs(), held)) and time.time() < deadline:
        time.sleep(0.001)


def all_reduce(d, t, op=dist.ReduceOp.SUM):
    """t reduced over the ranks, in place (a no-op on one process)."""
    if d.ddp:
        _collective(lambda: dist.all_reduce(t, op=op), (t,) if t.device.type == "cpu" else ())
    return t


def all_gather(d, t):
    """t from every rank, in rank order."""
    if not d.ddp:
        return [t]
    out = [torch.empty_like(t) for _ in range(d.world)]
    _collective(lambda: dist.all_gather(out, t), (t, *out) if t.device.type == "cpu" else ())
    return out


def shutdown(d):
    if d.ddp and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Optimisation


def adamw(named_parameters, lr, *, weight_decay, betas, no_decay=(), fused=False):
    """AdamW with weight decay on the weight matrices only: not on norms, biases and LayerScale
    (1-D), nor on the parameters named in no_decay (tokens, position embeddings)."""
    params = [(n, p) for n, p in named_parameters if p.requires_grad]
    decays = {n: p.ndim > 1 and n not in no_decay for n, p in params}
    return torch.optim.AdamW([{"params": [p for n, p in params if decays[n]], "weight_decay": weight_decay},
                              {"params": [p for n, p in params if not decays[n]], "weight_decay": 0.0}],
                             lr=lr, betas=betas, fused=fused)


def steps_per_epoch(sampler, batch_size, accum, world, what):
    """Optimizer steps in an epoch of the sampler; InputError when there is not even one. what: the
    samples, in words (e.g. "boxes.json: 3 usable boxes")."""
    n = len(sampler) // (batch_size * accum)
    if n == 0:
        raise InputError(f"{what} are fewer than one global batch "
                         f"({batch_size} × {accum} × {world} processes)")
    return n


def lr_at(step, total, peak, warmup, floor):
    """Linear warm-up, then cosine annealing from peak to floor over the rest of the schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


class SkipSampler(torch.utils.data.Sampler):
    """A DistributedSampler that starts `skip` samples into its epoch (resuming mid-epoch)."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        yield from it

    def __len__(self):
        return len(self.sampler) - self.skip


def resume_path(args):
    """The checkpoint --resume names: the run's own OUT/last.pt for "last", else the path given;
    None without --resume."""
    if not args.resume:
        return None
    return os.path.join(args.out, "last.pt") if args.resume == "last" else args.resume


def resume_state(path, now, keys, what):
    """The checkpoint to resume from, checked: it loads, is a `what` checkpoint, and has the same
    value as `now` (a dict) for each of keys, which the data position and the schedule follow from."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no checkpoint to resume from")
    ck = load_checkpoint(path, "--resume checkpoint")  # the command's name comes first in its line
    need_keys(ck, ("args", "world", "model_args", "step", "epoch", "optimizer", "rng"), path,
              f"{what} checkpoint")
    saved = dict(ck["args"], world=ck["world"], model_args=ck["model_args"])
    for key in keys:
        if saved.get(key) != now[key]:
            raise InputError(f"{path}: {key} was {saved.get(key)} and is now {now[key]}; "
                             f"resume with the same value")
    return ck


def rank0_log(d):
    """print(*m) to stderr on rank 0, nothing on the other ranks: one copy of each line."""
    return (lambda *m: print(*m, file=sys.stderr, flush=True)) if d.rank == 0 else (lambda *m: None)


class SaveClock:
    """When to write last.pt between epoch ends: every `steps` optimizer steps, or (steps None or 0) about
    every `minutes`, so that a killed run repeats minutes, not hours. The minutes become a step
    interval after the first `calibrate` steps, from the slowest rank's time: every rank must take
    part in a save (it gathers their RNG states), so all decide at the same steps."""

    def __init__(self, start_step, minutes=10.0, steps=None, d=None, calibrate=20):
        self.minutes, self.interval, self.d, self.calibrate = minutes, steps or None, d, calibrate
        self.anchor, self.t0, self.step0 = 0, time.time(), start_step

    def due(self, step):
        if self.interval is None:
            if step - self.step0 < self.calibrate:
                return False
            per_step = torch.tensor([(time.time() - self.t0) / (step - self.step0)], dtype=torch.float64,
                                    device=self.d.device if self.d else "cpu")
            if self.d:
                all_reduce(self.d, per_step, op=dist.ReduceOp.MAX)
            self.interval, self.anchor = max(1, round(60 * self.minutes / float(per_step))), step
        return (step - self.anchor) % self.interval == 0


# ----------------------------------------------------------------------------------------------
# The training loop that train.py and pretrain.py share


class Progress:
    """Progress lines on stderr and in OUT/log.jsonl (rank 0): the means of the loss terms since the
    last line, what the command adds of the step just taken (extra), the learning rate, the rate, the
    ETA and the unreadable samples skipped on rank 0. rate: its unit in the line and its key in
    log.jsonl; samples: what the command calls a sample (crops, views)."""

    def __init__(self, args, d, step, stop_step, global_batch, rate, samples):
        self.log_every, self.stop_step, self.global_batch = args.log_every, stop_step, global_batch
        (self.rate_unit, self.rate_key), self.samples = rate, samples
        self.file = open(os.path.join(args.out, "log.jsonl"), "a") if d.rank == 0 else None
        self.t_line = self.t0 = time.time()
        self.step0, self.sums, self.names, self.unreadable = step, None, None, 0

    def add(self, terms, weight):
        """One micro-step's loss terms (a dict of 0-d tensors, "loss" among them); a zero weight keeps a
        dummy batch out."""
        self.names = list(terms)
        t = torch.stack(list(terms.values()) + [torch.ones_like(terms["loss"])]) * (weight > 0)
        self.sums = t if self.sums is None else self.sums + t

    @contextlib.contextmanager
    def paused(self):
        """Time that is not training (a save, a validation): the rate and the ETA leave it out."""
        start = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - start

    def line(self, epoch, step, lr, extra):
        if self.file is None or not (time.time() - self.t_line > self.log_every or step == self.stop_step):
            return
        *sums, n = self.sums.tolist()  # .tolist() only here: no host syncs inside the loop
        means = {k: v / max(n, 1) for k, v in zip(self.names, sums)}
        rate = (step - self.step0) * self.global_batch / (time.time() - self.t0)
        eta = (self.stop_step - step) * self.global_batch / max(rate, 1e-9)
        rec = dict(epoch=epoch, step=step, total=self.stop_step, **means, **extra, lr=lr,
                   **{self.rate_key: rate}, eta_s=eta, unreadable=self.unreadable)
        detail = (" ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
                  + "".join(f", {k} {v:.3g}" for k, v in extra.items()))
        print(f"epoch {epoch} step {step}/{self.stop_step} loss {means['loss']:.4f}"
              + (f" ({detail})" if detail else "") + f" lr {lr:.3g} {rate:.1f} {self.rate_unit} "
              f"ETA {eta / 60:.1f} min"
              + (f" ({self.unreadable} unreadable {self.samples} skipped on rank 0)" if self.unreadable
                 else ""),
              file=sys.stderr, flush=True)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.t_line, self.t0, self.step0, self.sums = time.time(), time.time(), step, None


class Loop:
    """The skeleton of train.py's and pretrain.py's loop; each command writes its own step into it:

        loop = util.Loop(...)                     # from here a signal ends the run after its step
        while loop.next_step():                   # the epoch's data, resumed where the checkpoint stopped
            for b, weight, sync in loop.micro_batches(model):
                with sync:                        # DDP's all-reduce on the last micro-step only
                    ...; (loss * weight).backward()
                loop.progress.add(terms, weight)
            opt.step(); opt.zero_grad(set_to_none=True)
            if loop.end_step(lr):                 # its line, last.pt on the save clock, a signal asked
                loop.save()                       # an epoch's end: the command's own work, then last.pt
        loop.finish()                             # last.pt; after a signal its line and exit status

    It keeps the run's position (step, epoch, a checkpoint's), the data order (a resumed epoch skips
    the samples it has done: the same batches as a run that never stopped), the save clock and the
    progress lines. A batch without a readable sample has weight 0: the command puts a dummy in its
    place, so that every rank runs as many forwards (and DDP all-reduces) as the others.
    A checkpoint is checkpoint(step=, epoch=, world=, rng=, args=), the command's dict around the
    loop's keys, where rng is every rank's rng_state(); args' batch_size, accum, workers, seed, out,
    save_minutes, save_every and log_every drive the loop. rate and samples name the progress lines'
    units (Progress)."""

    def __init__(self, args, d, stop, dataset, sampler, collate, steps_per_epoch, stop_step, *, step, epoch,
                 checkpoint, rng_state, rate, samples):
        self.args, self.d, self.stop = args, d, stop
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.steps_per_epoch, self.stop_step = steps_per_epoch, stop_step
        self.step, self.epoch, self.signum, self.batches = step, epoch, 0, None
        self.checkpoint, self.rng_state = checkpoint, rng_state
        self.last = os.path.join(args.out, "last.pt")
        self.progress = Progress(args, d, step, stop_step, args.batch_size * args.accum * d.world, rate,
                                 samples)
        self.clock = SaveClock(step, args.save_minutes, args.save_every, d)
        stop.loop(d)

    def next_step(self):
        """True while there is a step to take (no signal asked to stop); opens the epoch's data first."""
        if self.step >= self.stop_step or self.signum:
            return False
        if self.batches is None:
            done = self.step - self.epoch * self.steps_per_epoch
            if done == self.steps_per_epoch:  # a checkpoint of an epoch's last step, its end not counted
                self.epoch, done = self.epoch + 1, 0
            self.dataset.set_epoch(self.epoch)  # the augmentations' seeds (and a grouped sampler's order)
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(self.epoch)
            a = self.args
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=a.batch_size,
                sampler=SkipSampler(self.sampler, done * a.batch_size * a.accum), num_workers=a.workers,
                collate_fn=self.collate, pin_memory=self.d.device.type == "cuda", drop_last=True,
                generator=torch.Generator().manual_seed(a.seed + self.epoch))
            self.batches = iter(loader)
        return True

    def micro_batches(self, model):
        """The step's micro-batches: (batch, weight, sync), the weight 1/accum, or 0 for a batch whose
        samples were all unreadable; sync is the context of the forward and backward: DDP's no_sync
        but on the last."""
        accum = self.args.accum
        for micro in range(accum):
            b = next(self.batches)
            weight = 1.0 / accum if len(b["image"]) else 0.0
            last = micro == accum - 1 or not self.d.ddp
            yield b, weight, contextlib.nullcontext() if last else model.no_sync()

    def end_step(self, lr, extra=None):
        """The optimizer step is taken: count it, its progress line (with extra's numbers) when due,
        last.pt when the save clock says, and whether a signal asked any rank to stop. True at an
        epoch's end (counted in self.epoch, its data closed): the command then does its epoch's work
        and calls save(), which the clock leaves to it."""
        self.step += 1
        self.progress.line(self.epoch, self.step, lr, extra or {})
        ended = self.step == (self.epoch + 1) * self.steps_per_epoch
        if self.clock.due(self.step) and not ended:
            self.save()
        self.signum = self.stop.requested()
        if ended:
            self.batches = None
            self.epoch += 1
        return ended

    def save(self, *also):
        """The whole state to OUT/last.pt and the paths in also, written atomically by rank 0. Every rank
        calls it: it gathers their random states, for an exact resume. Its time is not training time."""
        with self.progress.paused():
            rng = [self.rng_state()]
            if self.d.ddp:
                rng = rng * self.d.world
                dist.all_gather_object(rng, rng[0])
            if self.d.rank == 0:
                state = self.checkpoint(step=self.step, epoch=self.epoch, world=self.d.world, rng=rng,
                                        args=vars(self.args))
                for path in (self.last, *also):
                    with atomic_file(path) as f:
                        torch.save(state, f)

    def finish(self):
        """After the loop: last.pt (unless the epoch's end has just written it); after a signal, the line
        that says what is kept and the command that continues, and exit status 128 + the signal."""
        self.batches = None
        if self.step % self.steps_per_epoch:
            self.save()
        if self.signum:
            shutdown(self.d)
            self.stop.exit(self.signum, f"{self.last} at step {self.step} of {self.stop_step}")


# ----------------------------------------------------------------------------------------------
# Output


def dataloader_warning_once():
    """torch's warning that a DataLoader has more workers than the machine has cores, once a run: its code
    checks twice, from two lines, so the default filter shows it twice."""
    warnings.filterwarnings("once", message="This DataLoader will create")


def duration(seconds):
    """Seconds in words a person reads at a glance: 45 s, 12 min, 7.5 h."""
    return (f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400
            else f"{seconds / 3600:.1f} h")


# ----------------------------------------------------------------------------------------------
# Public pretrained encoders by name (recipes.PRETRAINED), kept in torch.hub's cache


def pretrained_cache():
    """Where the named encoders are kept: torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def pretrained_file(init, download=True):
    """The local file of train.py --init and label.py --encoder: a path as it is, or a recipes.PRETRAINED
    name's file in pretrained_cache(), downloaded first when absent (download=False: only looked up).
    A one-line error for a name that is neither, and, when the download fails (no network), one that
    says which file to fetch and where to put it."""
    if os.path.exists(init) or init not in recipes.PRETRAINED:
        if not os.path.exists(init) and os.sep not in init and not init.endswith((".pth", ".pt")):
            raise InputError(f"{init}: neither a file nor a known encoder ({', '.join(recipes.PRETRAINED)})")
        return init
    url = recipes.PRETRAINED[init]
    path = os.path.join(pretrained_cache(), os.path.basename(url))
    if os.path.exists(path) or not download:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, progress=True)  # to a temporary file, then renamed
    except (OSError, urllib.error.URLError) as e:
        raise InputError(f"{init}: cannot download {url} ({getattr(e, 'reason', e)}); fetch it on a "
                         f"machine that is online and put it at {path}") from None
    return path

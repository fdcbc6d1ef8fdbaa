"""util.py: checkpoint and JSON reading say in one line what a file is not; the save clock; AdamW groups;
the training loop's data order, accumulation and checkpoint position."""
import argparse
import json
import pickle
import sys
import threading

import pytest
import torch
import torch.distributed as dist

import util


def test_checkpoint_errors_say_what_the_file_is_not(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0), "step": 3}, good)
    assert util.load_checkpoint(good)["step"] == 3
    cases = [(tmp_path / "missing.pt", None, r"missing.pt: no such file$"),
             (tmp_path, None, r": a folder, not a checkpoint$"),
             (tmp_path / "random.pt", b"\x00\x01 some bytes that are not a checkpoint",
              r"random.pt: not a PyTorch checkpoint \(torch.save writes a zip archive; "
              r"this file starts with"),
             (tmp_path / "text.pt", b"hello world", r"text.pt: not a PyTorch checkpoint"),
             (tmp_path / "list.pt", None, r"list.pt: holds a list, not a checkpoint's dict$")]
    torch.save([1, 2], tmp_path / "list.pt")
    blob = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[:len(blob) // 2])
    cases.append((tmp_path / "cut.pt", None,
                  rf"cut.pt: truncated: {len(blob) // 2:,} bytes, where its index lists "
                  rf"4,000 bytes of tensors \(an interrupted copy or save\?\)$"))
    (tmp_path / "cut_early.pt").write_bytes(blob[:100])
    cases.append((tmp_path / "cut_early.pt", None,
                  "cut_early.pt: truncated: 100 bytes, cut inside its index"))
    for path, content, msg in cases:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(util.InputError, match=msg) as e:
            util.load_checkpoint(path, "checkpoint")
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on loading",))


def test_a_checkpoint_with_code_is_refused_without_advice(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"w": torch.zeros(2), "obj": Payload()}, path, pickle_module=pickle)
    with pytest.raises(util.InputError, match="code.pt: holds pickled objects besides tensors") as e:
        util.load_checkpoint(path, "--init")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_json_errors_name_the_file_and_the_key(tmp_path):
    (tmp_path / "a.json").write_text('{"images": [], "annotations": []}')
    assert util.read_json(tmp_path / "a.json", "x", keys=("images",)) == {"images": [], "annotations": []}
    (tmp_path / "bad.json").write_text('{"images": [}')
    (tmp_path / "nokey.json").write_text('{"annotations": []}')
    (tmp_path / "list.json").write_text('[1, 2]')
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    for name, msg in (("missing.json", "missing.json: no such file$"),
                      ("bad.json", r"bad.json: not valid JSON \(Expecting value at line 1, column 13\)$"),
                      ("nokey.json", r"nokey.json: no 'images' key \(a dict\)$"),
                      ("list.json", r"list.json: no 'images' key \(a list, not a dict\)$"),
                      ("bin.json", r"bin.json: not JSON \(not even text\)$")):
        with pytest.raises(util.InputError, match=msg):
            util.read_json(tmp_path / name, "--json", keys=("images",))


def test_save_clock_turns_minutes_into_a_step_interval(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(util.time, "time", lambda: now[0])
    clock = util.SaveClock(start_step=100, minutes=1.0, calibrate=20)
    due = []
    for step in range(101, 400):
        now[0] += 0.5  # half a second a step: a minute is 120 steps
        due.append(clock.due(step))
    assert [101 + i for i, d in enumerate(due) if d] == [120, 240, 360]
    assert [s for s in range(1, 50) if util.SaveClock(0, steps=20).due(s)] == [20, 40]


def test_adamw_decays_weight_matrices_only():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    token = torch.nn.Parameter(torch.zeros(1, 2, 4))
    net.register_parameter("token", token)
    opt = util.adamw(net.named_parameters(), 0.1, weight_decay=0.05, betas=(0.9, 0.9), no_decay=("token",))
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [(4, 3)]
    assert (plain["weight_decay"] == 0 and len(plain["params"]) == 4
            and any(p is token for p in plain["params"]))


def test_write_json_is_atomic(tmp_path, monkeypatch):
    util.write_json(tmp_path / "a.json", {"x": 1})
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        util.write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1} and len(list(tmp_path.iterdir())) == 1


def test_collectives_return_once_the_workers_let_go(tmp_path):
    """After util.all_gather and all_reduce no gloo worker thread holds the tensors (a worker that
    drops them while the interpreter finalizes aborts the process)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        d = util.Dist(True, 0, 1, torch.device("cpu"))
        for _ in range(20):
            t, untouched = torch.arange(3.0), torch.arange(3.0)
            out = util.all_gather(d, t)
            gathered = [sys.getrefcount(x) for x in (t, out[0], untouched)]  # each: a name, x, the call
            assert torch.equal(out[0], t) and len(out) == 1
            assert util.all_reduce(d, t) is t
            reduced = [sys.getrefcount(x) for x in (t, untouched)]
            assert len(set(gathered)) == 1 and len(set(reduced)) == 1, (gathered, reduced)
    finally:
        dist.destroy_process_group()


def test_a_collective_waits_until_its_tensors_are_let_go():
    t, let_go = torch.zeros(3), []

    def run():  # a stand-in for a worker thread that drops its reference after the collective returns
        held = [t]
        threading.Timer(0.05, lambda: (held.clear(), let_go.append(True))).start()

    util._collective(run, (t,))
    assert let_go


class Numbers(torch.utils.data.Dataset):
    """Sample i of epoch e is the pair (i, e)."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return {"image": torch.tensor([i, self.epoch])}


def run_loop(out, model, d, step, epoch, stop_step):
    """util.Loop from a position (step, epoch) to stop_step, 2 micro-batches of 2 a step, 5 steps an epoch:
    (step, the micro-batch's samples, whether DDP all-reduces its gradients) for each, and last.pt."""
    out.mkdir()
    args = argparse.Namespace(batch_size=2, accum=2, workers=0, seed=5, out=str(out), save_minutes=10.0,
                              save_every=None, log_every=1e9)
    dataset = Numbers(21)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, 1, 0, seed=5, drop_last=True)
    loop = util.Loop(args, d, util.Stop("test", lambda: ("", "")), dataset, sampler, None, 5, stop_step,
                     step=step, epoch=epoch, checkpoint=lambda **position: position,
                     rng_state=lambda: {"r": 1}, rate=("samples/s", "samples_per_s"), samples="samples")
    seen = []
    while loop.next_step():
        for b, weight, sync in loop.micro_batches(model):
            with sync:
                seen.append((loop.step, b["image"].tolist(), model.require_backward_grad_sync))
            loop.progress.add({"loss": torch.zeros(())}, weight)
        if loop.end_step(0.1):
            loop.save()
    loop.finish()
    return seen, torch.load(out / "last.pt", weights_only=True)


def test_a_loop_resumed_anywhere_sees_the_batches_of_one_that_never_stopped(tmp_path):
    """From a mid-epoch step, or an epoch's last step whose end the checkpoint has not counted, the loop
    goes on with the samples an uninterrupted loop takes; DDP all-reduces on a step's last micro-batch
    only; last.pt holds the position and every rank's random state."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        d = util.Dist(True, 0, 1, torch.device("cpu"))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
        straight, ck = run_loop(tmp_path / "a", model, d, 0, 0, 12)
        assert [s[0] for s in straight] == [s // 2 for s in range(24)]
        assert [s[2] for s in straight] == [False, True] * 12
        assert [s[1][0][1] for s in straight] == [0] * 10 + [1] * 10 + [2] * 4  # the samples' epochs
        epoch0 = [i for s in straight[:10] for i, _ in s[1]]
        assert sorted(epoch0) == sorted(set(epoch0)) and epoch0 != sorted(epoch0)  # shuffled, none twice
        assert ((ck["step"], ck["epoch"], ck["world"], ck["rng"], ck["args"]["accum"])
                == (12, 2, 1, [{"r": 1}], 2))
        for step, epoch in ((7, 1), (5, 0), (5, 1)):
            resumed, ck = run_loop(tmp_path / f"{step}_{epoch}", model, d, step, epoch, 12)
            assert resumed == [s for s in straight if s[0] >= step], (step, epoch)
            assert (ck["step"], ck["epoch"]) == (12, 2)
    finally:
        dist.destroy_process_group()

"""util.py: checkpoint and JSON reading say in one line what a file is not; the save clock; AdamW groups."""
import json
import pickle

import pytest
import torch

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

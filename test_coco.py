"""coco.py: mask pasting and RLE against the crop mapping, reading boxes, the box index, the labeled
output."""
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import coco
import data
import util


def paste_mask(prob, crop_box, H, W, thr=0.5, box=None):
    """label.paste_region's mask, in its whole [H, W] image."""
    out = np.zeros((H, W), bool)
    ya, xa, region = coco.paste_region(prob, crop_box, H, W, thr, box)
    out[ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
    return out


def test_paste_region_inverts_data_crop_mapping():
    """Every image pixel samples the crop at data.image_to_crop of its centre (bilinear, clamped)."""
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(12, 9, generator=g)
    crop = (3.3, 5.7, 30.1, 41.9)
    H, W = 50, 40
    got = paste_mask(prob, crop, H, W, thr=0.5)
    p = prob.double().numpy()
    ref, near = np.zeros((H, W), bool), np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            if not (crop[0] <= x + 0.5 < crop[2] and crop[1] <= y + 0.5 < crop[3]):
                continue
            u = data.image_to_crop(x + 0.5, crop, 9)  # the x mapping...
            v = data.image_to_crop(y + 0.5, (crop[1], 0, crop[3], 0), 12)  # ...and the same for y
            u, v = min(max(u, 0), 8), min(max(v, 0), 11)
            u0, v0 = min(int(u), 7), min(int(v), 10)
            fu, fv = u - u0, v - v0
            val = ((1 - fv) * ((1 - fu) * p[v0, u0] + fu * p[v0, u0 + 1])
                   + fv * ((1 - fu) * p[v0 + 1, u0] + fu * p[v0 + 1, u0 + 1]))
            ref[y, x], near[y, x] = val > 0.5, abs(val - 0.5) < 1e-5
    assert ref.any() and (~ref).any()
    assert np.array_equal(got & ~near, ref & ~near)
    # A box restricts the mask to its pixel centres; an identity crop pastes pixel for pixel.
    assert not paste_mask(torch.ones(4, 4), crop, H, W, 0.5, box=(10, 10, 20, 20))[:, :10].any()
    one = torch.zeros(6, 8)
    one[2:4, 1:7] = 1
    m = paste_mask(one, (10, 20, 18, 26), 30, 30, 0.5)
    assert np.array_equal(np.argwhere(m), np.argwhere(np.pad(one.numpy() > 0.5, ((20, 4), (10, 12)))))


def test_encode_region_matches_encoding_the_whole_image():
    """encode_region (what labeling runs) gives encode's RLE of the whole-image mask, on
    random regions of random images, a region that starts at pixel 0 or ends at the last pixel, the
    whole image, an empty one, and the regions paste_region gives for random crops and boxes."""
    rng = np.random.default_rng(0)
    cases = [(5, 7, 0, 0, np.ones((5, 7), bool)), (5, 7, 2, 3, np.ones((3, 4), bool)),
             (5, 7, 0, 0, np.zeros((0, 0), bool)), (5, 7, 1, 1, np.zeros((2, 2), bool))]
    for k in range(400):
        H, W = (int(v) for v in rng.integers(1, 30, 2))
        ya, xa = int(rng.integers(0, H)), int(rng.integers(0, W))
        h, w = int(rng.integers(0, H - ya + 1)), int(rng.integers(0, W - xa + 1))
        cases.append((H, W, ya, xa, rng.random((h, w)) < (0.05, 0.5, 0.95)[k % 3]))
    for H, W, ya, xa, region in cases:
        full = np.zeros((H, W), bool)
        full[ya:ya + region.shape[0], xa:xa + region.shape[1]] = region
        assert coco.encode_region(ya, xa, region, H, W) == coco.encode(full), (H, W, ya, xa, region)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x0, y0 = (float(v) for v in torch.rand(2, generator=g) * 40 - 10)
        crop = (x0, y0, x0 + 5 + 40 * float(torch.rand(1, generator=g)),
                y0 + 5 + 30 * float(torch.rand(1, generator=g)))
        box = (crop[0] + 2, crop[1] + 1, crop[2] - 1, crop[3] - 2)
        prob = torch.rand(6, 7, generator=g)
        full = paste_mask(prob, crop, 30, 40, 0.5, box)
        ya, xa, region = coco.paste_region(prob, crop, 30, 40, 0.5, box)
        assert coco.encode_region(ya, xa, region, 30, 40) == coco.encode(full) and region.sum() == full.sum()


def test_non_integer_ids_are_rejected_by_name(tmp_path):
    base = dict(images=[dict(id=1, file_name="a.png")], categories=[{"id": 1}],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5])])
    for where, key, value, msg in (("annotations", "id", "a7", "annotation #1 has a non-integer id 'a7'"),
                                   ("annotations", "image_id", True,
                                    "annotation #1 has a non-integer image_id True"),
                                   ("images", "id", "1", "image #0 has a non-integer id '1'")):
        src = json.loads(json.dumps(base))
        if where == "annotations":
            src["annotations"].append(dict(src["annotations"][0], id=2))
        src[where][-1][key] = value
        (tmp_path / "b.json").write_text(json.dumps(src))
        with pytest.raises(util.InputError, match=msg):
            coco.box_index(str(tmp_path / "b.json"))


def test_unlabeled_boxes_can_get_their_filled_box():
    out = dict(images=[dict(id=1, width=10, height=8), dict(id=2, file_name="nosize.png")], categories=[])
    anns = [dict(id=1, image_id=1, bbox=[2, 1, 4, 3], segmentation=[[0, 0, 1, 1]], mask_score=0.9),
            dict(id=2, image_id=2, bbox=[0, 0, 2, 2]), dict(id=3, image_id=1, bbox=[2, 1, 0, 3]),
            dict(id=4, image_id=1, bbox=[20, 1, 4, 3]), dict(id=5, image_id=1, bbox=[float("inf"), 1, 4, 3])]
    results = {1: {"reason": "missing image"}, 2: {"reason": "missing image"}, 3: {"reason": "zero width"},
               4: {"reason": "outside"}, 5: {"reason": "non-finite"}}
    plain = coco.apply_labels(out, anns, results)["annotations"]
    assert "segmentation" not in plain[0] and plain[0]["area"] == 12.0  # the GT polygon is never passed on
    assert "mask_score" not in plain[0]  # nor an earlier labeling's score
    boxed = coco.apply_labels(out, anns, results, unlabeled_as="box")["annotations"]
    assert "mask_score" not in boxed[0]  # a filled box is no scored mask
    m = mask_utils.decode({"size": boxed[0]["segmentation"]["size"],
                           "counts": boxed[0]["segmentation"]["counts"].encode()})
    assert m.shape == (8, 10) and m.sum() == 12 and m[1:4, 2:6].all() and boxed[0]["area"] == 12.0
    assert "segmentation" not in boxed[1]  # no image size: no mask can be drawn
    for a in boxed[2:]:  # a box that covers no pixel: an empty mask of the image's size, still a mask on
                         # every box
        m = mask_utils.decode({"size": a["segmentation"]["size"],
                               "counts": a["segmentation"]["counts"].encode()})
        assert m.shape == (8, 10) and m.sum() == 0 and a["area"] == 0


def coco_doc(rng, n_images=6, n_anns=40):
    """An instances dict with the boxes box_problem sorts out: non-finite, zero-size, outside, covering
    no pixel centre, not 4 numbers, on an image of unknown size, on an image not listed."""
    images = [dict(id=int(i), file_name=f"im{i}é.png", width=int(rng.integers(5, 30)),
                   height=int(rng.integers(5, 30))) for i in rng.permutation(np.arange(10, 10 + n_images))]
    images[0].pop("width")
    images[1]["width"] = 0
    anns = []
    for k in range(n_anns):
        x, y = (float(v) for v in rng.uniform(-5, 30, 2).round(rng.integers(0, 3)))
        w, h = (float(v) for v in rng.choice([0.0, 0.3, 1.0, 4.5, 12.0, -1.0], 2))
        a = dict(id=int(1000 - 7 * k), image_id=int(rng.integers(9, 12 + n_images)), category_id=k % 3,
                 bbox=[x, y, w, h], iscrowd=int(k % 9 == 0), extra={"note": "ü", "k": [k, 0.1 * k]})
        if k % 5 == 0:
            a["area"] = float(k)
        if k % 7 == 0:
            a["segmentation"] = [[1, 1, 4, 1, 4, 4]]
        anns.append(a)
    for k, b in enumerate((None, [1, 2, 3], ["1", 2, 3, 4], [1, 2, "x", 4], [float("nan"), 1, 2, 2],
                           [float("inf"), 1, 2, 2], [True, 0, 2, 2])):
        anns.append(dict(id=5000 + k, image_id=images[3]["id"], category_id=1, bbox=b))
    return dict(info={"year": 2026}, images=images, licenses=[], annotations=anns, categories=[{"id": 1}])


def test_box_index_round_trips_the_json_and_sorts_boxes_like_box_problem(tmp_path, monkeypatch):
    """Every column, image entry and annotation of the index is the JSON's; labelable() agrees with
    box_problem box by box; reading in blocks of 7 characters (values cut anywhere) gives the same index."""
    src = coco_doc(np.random.default_rng(0))
    path = tmp_path / "b.json"
    path.write_text(json.dumps(src, indent=1))
    ix = coco.box_index(str(path))
    assert ix.path == str(path) + ".index" and os.path.exists(ix.path)
    assert ix.kind == "instances" and ix.has_gt
    assert ix.head == {"info": {"year": 2026}, "licenses": [], "categories": [{"id": 1}]}
    assert ix.head_keys == ["info", "images", "licenses", "annotations", "categories"]
    assert [ix.image(k) for k in range(ix.n_images)] == src["images"]
    assert [ix.file_name(k) for k in range(ix.n_images)] == [im["file_name"] for im in src["images"]]
    assert json.dumps([ix.annotation(r) for r in range(len(ix))]) == json.dumps(src["annotations"])  # NaN too
    ids = {im["id"]: k for k, im in enumerate(src["images"])}
    assert ix.ann_img_row.tolist() == [ids.get(a["image_id"], -1) for a in src["annotations"]]
    assert ix.ann_id.tolist() == [a["id"] for a in src["annotations"]]
    assert ix.rows_of_ids([a["id"] for a in src["annotations"]][::-1]).tolist() == list(range(len(ix)))[::-1]
    for k in range(ix.n_images):  # the per-image table: each image's rows, in input order
        rows = ix.ann_by_image[ix.img_start[k]:ix.img_start[k + 1]].tolist()
        assert rows == [r for r, a in enumerate(src["annotations"])
                        if a["image_id"] == src["images"][k]["id"]]
    ok = ix.labelable()
    images = {im["id"]: im for im in src["images"]}
    for r, a in enumerate(src["annotations"]):
        why = (f"image_id {a['image_id']} not in images" if a["image_id"] not in images
               else coco.box_problem(a, images[a["image_id"]]))
        assert ok[r] == (why is None) and ix.unlabelable_reason(r) == why, (a, why)
    assert 0 < ok.sum() < len(ok) - 10
    monkeypatch.setattr(coco, "READ_BLOCK", 7)
    small = coco._build(str(path), None, "--json", None)
    for name, a in small.arrays().items():
        assert np.array_equal(a, getattr(ix, name), equal_nan=True), name
    assert pickle.loads(pickle.dumps(ix)).annotation(3) == src["annotations"][3]  # travels as its path


def test_box_index_cache_is_rebuilt_when_the_json_changes_or_the_cache_is_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "b.json"
    src = coco_doc(np.random.default_rng(1), n_anns=10)
    path.write_text(json.dumps(src))
    first = coco.box_index(str(path))
    inode = os.stat(first.path).st_ino
    assert os.stat(coco.box_index(str(path)).path).st_ino == inode  # opened, not rebuilt
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # same size, another mtime: rebuilt
    assert os.stat(coco.box_index(str(path)).path).st_ino != inode
    src["annotations"][0]["bbox"] = [1, 1, 2, 2]
    path.write_text(json.dumps(src))  # another size
    assert coco.box_index(str(path)).annotation(0)["bbox"] == [1, 1, 2, 2]
    with open(first.path, "rb") as f:
        data = f.read()
    for bad in (data[:len(data) // 2], b"garbage", data[:40] + b"x" + data[41:], b""):
        with open(first.path, "wb") as f:
            f.write(bad)
        ix = coco.box_index(str(path))
        assert json.dumps([ix.annotation(r) for r in range(len(ix))]) == json.dumps(src["annotations"])
    # A folder that cannot be written: the index goes to MAL_CACHE_DIR.
    os.remove(first.path)
    monkeypatch.setenv("MAL_CACHE_DIR", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: real_access(p, m) and os.path.realpath(p) != str(tmp_path))
    ix = coco.box_index(str(path))
    assert os.path.dirname(ix.path) == str(tmp_path / "cache") and not os.path.exists(first.path)
    assert ix.ann_id.tolist() == [a["id"] for a in src["annotations"]]


def test_box_index_bad_input_is_one_line_naming_the_file_and_place(tmp_path):
    """Not JSON: json's own message and place; not COCO: the key or entry, as load_boxes named them."""
    cases = [('{"images": [] "annotations": []}', None),
             ('{"images": [], "annotations": [\n{"id": 1,}]}', None),
             ('', None), ('{"images": [], "annotations": []} x', None),
             ('\n\n  {"images": [],\n "annotations": [tru]}', None),
             ('{"images": [{"id": 1}], "annotations": [{"id": 1}]}',
              "annotation #0 lacks 'id' or 'image_id'"),
             ('{"images": [{"id": "a"}], "annotations": []}', "image #0 has a non-integer id 'a'"),
             ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1}, {"id": 1, "image_id": 1}]}',
              "annotation ids are not unique"),
             ('{"annotations": []}', "no 'images' key"), ('7', "holds a int, neither"),
             ('[{"image_id": 1, "bbox": [1, 1, 2, 2]}]',
              "is a COCO results list; its image entries are needed too"),
             ('{"images": {}, "annotations": []}', "'images' is not a list")]
    for text, msg in cases:
        (tmp_path / "e.json").write_text(text)
        if msg is None:
            with pytest.raises(json.JSONDecodeError) as e:
                json.loads(text)
            msg = f"not valid JSON ({e.value.msg} at line {e.value.lineno}, column {e.value.colno})"
        with pytest.raises(util.InputError) as e:
            coco.box_index(str(tmp_path / "e.json"))
        assert msg in str(e.value) and "e.json" in str(e.value) and "\n" not in str(e.value), text
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(util.InputError, match=r"bin.json: not JSON \(not even text\)$"):
        coco.box_index(str(tmp_path / "bin.json"))
    with pytest.raises(util.InputError, match=r"^box JSON .*nothing.json: no such file$"):
        coco.box_index(str(tmp_path / "nothing.json"))


def test_results_list_index_and_streamed_output_equal_the_in_memory_output(tmp_path):
    """A results list gets ids 1..N and iscrowd; write_labels writes byte for byte what json.dump of
    apply_labels' dict writes (both --unlabeled-as choices), and pycocotools loads it."""
    src = coco_doc(np.random.default_rng(2), n_anns=30)
    (tmp_path / "b.json").write_text(json.dumps(src))
    dets = [dict(image_id=a["image_id"], bbox=a["bbox"], score=0.5, category_id=1)
            for a in src["annotations"][:9]]
    dets[2]["iscrowd"] = 1
    (tmp_path / "d.json").write_text(json.dumps(dets))
    rix = coco.box_index(str(tmp_path / "d.json"), str(tmp_path / "b.json"))
    assert rix.kind == "results" and rix.has_gt
    assert rix.head_keys == ["info", "images", "licenses", "annotations", "categories"]
    assert json.dumps([rix.annotation(r) for r in range(len(rix))]) == \
        json.dumps([dict(d, id=i + 1, iscrowd=d.get("iscrowd", 0)) for i, d in enumerate(dets)])
    ix = coco.box_index(str(tmp_path / "b.json"))
    ok = ix.labelable()
    results = {}
    for r in np.flatnonzero(ok)[::2]:  # every other labelable box labeled, the others' images failed
        m = coco.box_mask(coco.xywh_to_xyxy(src["annotations"][r]["bbox"]), 30, 30)
        results[int(ix.ann_id[r])] = {"segmentation": coco.encode(m), "area": int(m.sum()),
                                      "mask_score": 0.25 + r}
    for r in np.flatnonzero(ok)[1::2]:
        results[int(ix.ann_id[r])] = {"reason": "image failed"}
    for unlabeled_as in ("none", "box"):
        out = tmp_path / f"out-{unlabeled_as}.json"
        rows = np.flatnonzero(ix.ann_iscrowd == 0)  # a subset, as --score-thr keeps one
        with open(out, "w") as f:
            written = list(coco.write_labels(f, ix, rows, lambda r: results.get(int(ix.ann_id[r])),
                                             unlabeled_as))
        anns = [src["annotations"][r] for r in rows]
        problems = {a["id"]: {"reason": ix.unlabelable_reason(r)} for r, a in zip(rows, anns) if not ok[r]}
        ref = coco.apply_labels({k: v for k, v in src.items() if k != "annotations"}, anns,
                                {**results, **problems}, unlabeled_as)
        assert out.read_text() == json.dumps(ref, separators=(",", ":"))
        assert json.dumps([a for a, _ in written]) == json.dumps(ref["annotations"])
        assert len(COCO(str(out)).getAnnIds()) == len(rows)


def test_write_instances_keeps_the_annotations_where_they_stood(tmp_path):
    """write_instances writes byte for byte what json.dump (compact) writes of the document with its
    annotations replaced, "annotations" in its own place (first here, then last as asked), each payload
    yielded once its annotation is written, the mask_score column read from the document."""
    src = coco_doc(np.random.default_rng(3), n_anns=12)
    src["annotations"][4]["mask_score"] = 0.75
    doc = {"annotations": src["annotations"], **{k: v for k, v in src.items() if k != "annotations"}}
    (tmp_path / "a.json").write_text(json.dumps(doc, indent=2))
    ix = coco.box_index(str(tmp_path / "a.json"))
    assert ix.ann_mask_score[4] == 0.75 and np.isnan(np.delete(ix.ann_mask_score, 4)).all()
    new = [dict(a, note=k) for k, a in enumerate(doc["annotations"])]
    for last, ref in ((False, {**doc, "annotations": new}),
                      (True, {**{k: v for k, v in doc.items() if k != "annotations"}, "annotations": new})):
        buf = io.StringIO()
        written = []
        for payload in coco.write_instances(buf, ix, ((a, k) for k, a in enumerate(new)), last):
            written.append(payload)
            assert buf.getvalue().endswith(json.dumps(new[payload], separators=(",", ":")))
        assert buf.getvalue() == json.dumps(ref, separators=(",", ":")) and written == list(range(len(new)))

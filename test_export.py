"""export.py: label.py's output as COCO polygons, YOLO-seg and instance PNGs, each read back by its real
client (pycocotools, ultralytics, Pillow), with what each format cannot hold counted exactly."""
import collections
import copy
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import coco
import export
import label
import util
from conftest import bbox, disc, label_argv

H, W = 48, 64


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def enclosed(m):
    """The off pixels of m that the outside cannot reach 4-connectedly (a plain flood fill: no OpenCV)."""
    h, w = m.shape
    free = ~np.pad(m, 1)
    seen = np.zeros_like(free)
    seen[0, 0] = True
    todo = collections.deque([(0, 0)])
    while todo:
        i, j = todo.popleft()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if 0 <= a < h + 2 and 0 <= b < w + 2 and free[a, b] and not seen[a, b]:
                seen[a, b] = True
                todo.append((a, b))
    return free[1:-1, 1:-1] & ~seen[1:-1, 1:-1]


def grow(m):
    """m dilated by a pixel (3 x 3)."""
    p = np.pad(m, 1)
    h, w = m.shape
    return np.any([p[1 + i:1 + i + h, 1 + j:1 + j + w] for i in (-1, 0, 1) for j in (-1, 0, 1)], 0)


def fill(parts, h, w):
    """The pixels whose centre lies inside any of the polygons (even-odd rule), exactly: no OpenCV."""
    cy, cx = np.mgrid[:h, :w] + 0.5
    out = np.zeros((h, w), bool)
    for p in parts:
        inside = np.zeros((h, w), bool)
        for (x1, y1), (x2, y2) in zip(p, np.roll(p, -1, 0)):
            if y1 != y2:
                inside ^= ((y1 > cy) != (y2 > cy)) & (cx < x1 + (cy - y1) * (x2 - x1) / (y2 - y1))
        out |= inside
    return out


def masks_case():
    """Masks of the first image: one with a hole, one of two parts, an overlapping pair, tiny ones."""
    ring = disc(H, W, 45, 14, 9) & ~disc(H, W, 45, 14, 4)
    two = disc(H, W, 10, 38, 4) | disc(H, W, 24, 40, 3)
    pixel, line, column, square = (np.zeros((H, W), bool) for _ in range(4))
    pixel[30, 30] = True
    line[25, 30:33] = True
    column[40:43, 35] = True
    square[3:5, 60:62] = True
    return dict(plain=disc(H, W, 15, 14, 9), ring=ring, two=two, big=disc(H, W, 46, 36, 7),
                small=disc(H, W, 54, 38, 5), pixel=pixel, line=line, column=column, square=square)


@pytest.fixture
def labeled(tmp_path):
    """label.py's output on three images (one in a sub-folder, with no box: background), the images,
    and the masks by annotation id."""
    img_dir = tmp_path / "img"
    (img_dir / "sub").mkdir(parents=True)
    for name, (w, h) in (("a.png", (W, H)), ("sub/b.png", (40, 30)), ("c.png", (30, 20))):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(img_dir / name)
    images = [dict(id=1, file_name="a.png", width=W, height=H),
              dict(id=2, file_name="sub/b.png", width=40, height=30),
              dict(id=5, file_name="c.png", width=30, height=20)]
    edge = np.zeros((20, 30), bool)
    edge[10:, 20:] = True  # touches the right and bottom borders
    edge[0:6, 0:3] = True  # and, as a second part, the top and left ones
    masks, anns = {}, []
    for i, m in enumerate([*masks_case().values(), np.zeros((H, W), bool)], 1):
        masks[i] = m
        anns.append(dict(id=i, image_id=1, category_id=7, bbox=bbox(m) if m.any() else [1.0, 1.0, 2.0, 2.0],
                         area=float(m.sum()), iscrowd=0, segmentation=coco.encode(m), mask_score=0.5,
                         extra="kept"))
    # A box label.py could not label: no segmentation.
    anns.append(dict(id=50, image_id=1, category_id=7, bbox=[2.0, 2.0, 5.0, 5.0], area=25.0, iscrowd=0))
    masks[60] = edge
    anns.append(dict(id=60, image_id=5, category_id=3, bbox=bbox(edge), area=float(edge.sum()), iscrowd=0,
                     segmentation=coco.encode(edge), mask_score=0.9))
    out = dict(images=images, annotations=anns, info={"note": "t"},
               categories=[{"id": 7, "name": 'say "cat"'}, {"id": 3, "name": "dog"}])
    return out, str(img_dir), masks


def test_trace_runs_along_the_pixel_edges():
    """Vertices on pixel corners, edges axis-aligned, and the polygons fill exactly the mask and its holes,
    on a pixel, a line and random masks full of holes, diagonal contacts and many parts."""
    pytest.importorskip("cv2")
    o = export.trace(np.pad([[True]], ((2, 1), (3, 4))))
    assert len(o.parts) == 1 and sorted(map(tuple, o.parts[0])) == [(3, 2), (3, 3), (4, 2), (4, 3)]
    o = export.trace(np.pad([[True, True, True]], ((1, 1), (2, 0))))
    assert sorted(map(tuple, o.parts[0])) == [(2, 1), (2, 2), (5, 1), (5, 2)] and o.hole_pixels == 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        o = export.trace(m)
        holes = enclosed(m)
        assert o.hole_pixels == holes.sum()
        assert np.array_equal(fill(o.parts, h, w), m | holes), m.astype(int)
        for p in o.parts:
            d = np.roll(p, -1, 0) - p
            assert len(p) >= 4 and ((d[:, 0] == 0) != (d[:, 1] == 0)).all()  # no repeats, no diagonals
        assert sum(export._area(p) for p in o.parts) == (m | holes).sum()
        if o.parts:  # pycocotools fills pixel-edge polygons exactly, pinches and all
            rle = mask_utils.merge(mask_utils.frPyObjects([p.ravel().tolist() for p in o.parts], h, w))
            assert np.array_equal(mask_utils.decode(rle).astype(bool), m | holes)


def test_join_bridges_parts_like_ultralytics():
    """The joined polygon visits every vertex of every part; the only extra edges are the bridges,
    each walked there and back."""
    pytest.importorskip("cv2")
    m = np.zeros((30, 40), bool)
    m[2:6, 2:9] = m[20:25, 3:7] = m[10:12, 30:38] = True
    parts = export.trace(m).parts
    poly = export.join(parts)
    assert len(parts) == 3 and len(poly) == sum(len(p) + 2 for p in parts) - 2
    own = {frozenset(map(tuple, (a, b))) for p in parts for a, b in zip(p, np.roll(p, -1, 0))}
    extra = collections.Counter(frozenset(map(tuple, (a, b))) for a, b in zip(poly, np.roll(poly, -1, 0)))
    extra = {e: n for e, n in extra.items() if e not in own}
    assert len(extra) == 2 and set(extra.values()) == {2}


def test_coco_polygons_load_and_decode_in_pycocotools(labeled, tmp_path):
    pytest.importorskip("cv2")
    from pycocotools.coco import COCO

    out, _, masks = labeled
    dest = tmp_path / "poly.json"
    s = export.write(coco.index_of_dict(out), "coco-polygons", dest)
    ring = masks_case()["ring"]
    n = sum(m.any() for m in masks.values())
    assert s == dict(images=3, annotations=len(out["annotations"]), masks=len(masks),
                     polygons=n + 2, unlabeled=1, empty_masks=1, holes_dropped=1,  # + 2: two masks of 2 parts
                     hole_pixels_filled=int(enclosed(ring).sum()), degenerate_parts_dropped=0)
    gt = COCO(str(dest))
    res = gt.loadRes(copy.deepcopy(gt.dataset["annotations"]))
    got = json.loads(dest.read_text())
    assert got["info"] == out["info"] and got["categories"] == out["categories"]
    ious = []
    for k, (a, b) in enumerate(zip(out["annotations"], got["annotations"])):
        same = [key for key in {*a, *b} if key not in ("segmentation", "mask_score")]
        assert [a.get(key) for key in same] == [b.get(key) for key in same]
        m = masks.get(a["id"])
        if m is None or not m.any():  # unlabeled, or an empty mask: a box without a mask
            assert "segmentation" not in b and "mask_score" not in b
            continue
        assert b["mask_score"] == a["mask_score"]
        assert all(len(p) >= 6 and all(isinstance(v, int) for v in p) for p in b["segmentation"])
        for decoded in (gt.annToMask(b), res.annToMask(res.anns[k + 1])):  # loadRes numbers them from 1
            assert np.array_equal(decoded.astype(bool), m | enclosed(m))  # pycocotools fills them exactly
        if not enclosed(m).any():
            ious.append(iou(gt.annToMask(b).astype(bool), m))
    assert len(ious) == len(masks) - 2 and np.mean(ious) >= 0.95


def test_yolo_passes_ultralytics_checker_and_decodes(labeled, tmp_path):
    pytest.importorskip("cv2")
    utils = pytest.importorskip("ultralytics.data.utils")
    yaml = pytest.importorskip("yaml")

    out, img_dir, masks = labeled
    dest = tmp_path / "yolo"
    s = export.write(coco.index_of_dict(out), "yolo", dest, img_dir)
    n = sum(m.any() for m in masks.values())
    assert s == dict(images=3, label_files=3, lines=n, images_linked=3, images_copied=0, images_missing=0,
                     masks=len(masks), parts_joined=2, holes_dropped=1, empty_masks=1, unlabeled_skipped=1,
                     hole_pixels_filled=int(enclosed(masks_case()["ring"]).sum()), degenerate_parts_dropped=0)
    data = yaml.safe_load((dest / "data.yaml").read_text())
    assert data == dict(path=str(dest.resolve()), train="images", val="images",
                        names={0: "dog", 1: 'say "cat"'})
    assert (dest / "labels" / "sub" / "b.txt").read_text() == ""  # background, not missing
    by_image = collections.defaultdict(list)
    for a in out["annotations"]:
        if a["id"] in masks and masks[a["id"]].any():
            by_image[a["image_id"]].append(a)
    ious = []
    for im in out["images"]:
        im_file = str(dest / "images" / im["file_name"])
        assert os.path.realpath(im_file) == os.path.realpath(os.path.join(img_dir, im["file_name"]))
        lb_file = utils.img2label_paths([im_file])[0]
        im_file, lb, shape, segments, _, nm, nf, ne, nc, msg = utils.verify_image_label(
            (im_file, lb_file, "", False, 2, 0, 0, False))
        assert (nm, nf, nc, msg) == (0, 1, 0, "") and shape == (im["height"], im["width"])
        assert ne == (not by_image[im["id"]]) and len(segments) == len(by_image[im["id"]])
        h, w = shape
        for a, row, seg in zip(by_image[im["id"]], lb, segments):
            m = masks[a["id"]]
            assert row[0] == (0 if a["category_id"] == 3 else 1)
            # ultralytics takes the box from the polygon: from the centre of the mask's first pixel to that of
            # its last, centred on the mask's box
            x, y, bw, bh = bbox(m)
            assert np.allclose(row[1:] * (w, h, w, h), (x + bw / 2, y + bh / 2, bw - 1, bh - 1), atol=1e-4)
            # What is written is the outline through the boundary pixels' centres, to the written precision...
            xy = seg * np.float32([w, h])
            assert np.allclose(xy, export.join(export.trace(m, centres=True).parts) + 0.5, atol=1e-4)
            # ...which polygon2mask (cv2.fillPoly, the outline's pixels included) draws back as the mask, its
            # holes filled and, between the parts of a mask, the bridges' pixels added.
            at1 = utils.polygon2mask((h, w), [xy.ravel()]).astype(bool)
            assert not (m & ~at1).any()
            if len(export.trace(m).parts) == 1:
                assert np.array_equal(at1, m | enclosed(m))
            if not enclosed(m).any():
                ious.append(iou(at1, m))
    assert len(ious) == n - 1 and np.mean(ious) >= 0.95
    # A rerun replaces what it wrote; images already in place (image_dir = dest/images) are left alone.
    before = {p: open(p).read() for p in map(str, (dest / "labels").rglob("*.txt"))}
    s2 = export.write(coco.index_of_dict(out), "yolo", dest, str(dest / "images"))
    assert s2 == s and before == {p: open(p).read() for p in map(str, (dest / "labels").rglob("*.txt"))}
    assert Image.open(dest / "images" / "sub" / "b.png").size == (40, 30)


def test_png_instances_read_back_with_pillow(labeled, tmp_path):
    out, _, masks = labeled
    dest = tmp_path / "png"
    s = export.write(coco.index_of_dict(out), "png", dest)
    case = masks_case()
    n = sum(m.any() for m in masks.values())
    assert s == dict(images=3, pngs=3, instances=n, empty_masks=1, unlabeled_skipped=1,
                     overlap_pixels_lost=int((case["big"] & case["small"]).sum()), instances_hidden=0,
                     images_without_size=0)
    assert (case["big"] & case["small"]).any()
    mapping = json.loads((dest / "instances.json").read_text())
    labeled_ids = {im["file_name"]: [a["id"] for a in out["annotations"] if a["image_id"] == im["id"]
                                     and a["id"] in masks and masks[a["id"]].any()] for im in out["images"]}
    assert {f: list(v.values()) for f, v in mapping.items()} == labeled_ids
    ious = []
    for im in out["images"]:
        img = Image.open(dest / (os.path.splitext(im["file_name"])[0] + ".png"))
        assert img.mode.startswith("I") and img.size == (im["width"], im["height"])
        label = np.array(img)
        assert set(np.unique(label)) - {0} <= {int(k) for k in mapping[im["file_name"]]}
        for k, aid in mapping[im["file_name"]].items():
            got, m = label == int(k), masks[aid]
            assert not (got & ~m).any()  # an instance's pixels are its own
            ious.append(iou(got, m))
        assert np.array_equal(label > 0, np.any([masks[a] for a in mapping[im["file_name"]].values()] or
                                                [np.zeros_like(label, bool)], axis=0))  # holes stay holes
    # the smaller of an overlapping pair is on top
    a_ids = {v: int(k) for k, v in mapping["a.png"].items()}
    label = np.array(Image.open(dest / "a.png"))
    big, small = (list(masks_case()).index(k) + 1 for k in ("big", "small"))
    assert (label[masks[big] & masks[small]] == a_ids[small]).all()
    assert len(ious) == n and np.mean(ious) >= 0.95


def test_png_counts_hidden_instances_and_refuses_too_many(tmp_path):
    m = np.zeros((6, 8), bool)
    m[1:3, 2:5] = True
    ann = dict(image_id=1, category_id=1, bbox=bbox(m), segmentation=coco.encode(m))
    out = dict(images=[dict(id=1, file_name="x.jpg", width=8, height=6)], categories=[{"id": 1, "name": "a"}],
               annotations=[dict(ann, id=1), dict(ann, id=2)])
    s = export.write(coco.index_of_dict(out), "png", tmp_path / "p")
    assert (s["instances"], s["instances_hidden"], s["overlap_pixels_lost"]) == (2, 1, m.sum())
    one = np.ones((1, 1), bool)
    out = dict(images=[dict(id=1, file_name="x.jpg", width=1, height=1)], categories=[],
               annotations=[dict(id=i, image_id=1, segmentation=coco.encode(one)) for i in range(65536)])
    with pytest.raises(util.InputError, match=r"image 1 \(x.jpg\): 65536 masks, more than a 16-bit PNG"):
        export.write(coco.index_of_dict(out), "png", tmp_path / "q")


def test_polygon_formats_without_opencv_say_how_to_install(labeled, tmp_path, monkeypatch):
    out, img_dir, _ = labeled
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    for fmt, dest in (("coco-polygons", tmp_path / "p.json"), ("yolo", tmp_path / "y")):
        with pytest.raises(util.InputError) as e:
            export.write(coco.index_of_dict(out), fmt, dest, img_dir)
        assert str(e.value) == f"the {fmt} format needs OpenCV: pip install opencv-python-headless"
        assert not os.path.exists(dest)
    # a raster needs no OpenCV
    assert export.write(coco.index_of_dict(out), "png", tmp_path / "png")["pngs"] == 3


def test_bad_input_is_one_line_naming_it(labeled, tmp_path):
    pytest.importorskip("cv2")
    out, img_dir, _ = labeled
    cases = [("tiff", {}, r"format 'tiff': not one of coco-polygons, yolo, png"),
             ("yolo", {}, r"the yolo format needs the images' folder"),
             ("png", dict(images=[dict(out["images"][0], file_name="../a.png"), *out["images"][1:]]),
              r"file_name '../a.png' is not a path"),
             ("png", dict(images=[*out["images"], dict(id=9, file_name="a.jpg", width=4, height=4)]),
              r"images 'a.png' and 'a.jpg' would both write"),
             ("yolo", dict(categories=[{"id": 7, "name": "cat"}]),
              r"annotation 60: category_id 3 is not in categories"),
             ("png", dict(images=[dict(out["images"][0], width=65), *out["images"][1:]]),
              r"annotation 1: its mask is 64x48 but image 1 is 65x48")]
    for fmt, change, msg in cases:
        with pytest.raises(util.InputError, match=msg) as e:
            export.write(coco.index_of_dict({**out, **change}), fmt, tmp_path / "o",
                         img_dir if change else None)
        assert "\n" not in str(e.value)


def _tree(root):
    """{relative path: bytes, or the target of a link} of every file under root."""
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            files[os.path.relpath(p, root)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return files


@pytest.mark.parametrize("fmt", ["png", "coco-polygons", "yolo"])
def test_the_command_writes_label_pys_files_byte_for_byte(world, tmp_path, fmt):
    """export.py on label.py's labels file writes the same --format, --vis and --review files as label.py
    itself, byte for byte (the format's files into the same place: data.yaml holds its folder)."""
    if fmt != "png":
        pytest.importorskip("cv2", reason=f"--format {fmt} needs OpenCV (opencv-python-headless)")
    dest = tmp_path / ("out.json" if fmt == "coco-polygons" else "out")
    labels = tmp_path / "out.rle.json" if fmt == "coco-polygons" else dest / "labels.json"
    label.main(label_argv(world, dest, "--format", fmt, "--vis", "3", "--review", "4"))
    made_by_label = _tree(tmp_path)
    exported = [p for p in made_by_label if not os.path.basename(p).startswith(("out.rle", "labels."))]
    assert any(p.endswith(".png") and ".vis" in p for p in exported)
    assert any(".review" in p for p in exported) and any(p.startswith("out") for p in exported)
    for p in exported:
        os.remove(tmp_path / p)
    export.main([str(labels), "--images", str(world / "img"), "--format", fmt, "--out", str(dest),
                 "--vis", "3", "--review", "4"])
    assert _tree(tmp_path) == made_by_label


def test_the_command_says_what_is_wrong_in_one_line(world, tmp_path):
    with pytest.raises(SystemExit, match="^export.py: labels file .*nope.json: no such file"):
        export.main([str(tmp_path / "nope.json"), "--images", str(world / "img"), "--vis", "1"])
    with pytest.raises(SystemExit, match="^export.py: --images .*nowhere: no such image folder"):
        export.main([str(world / "boxes.json"), "--images", str(tmp_path / "nowhere"), "--vis", "1"])
    with pytest.raises(SystemExit):  # nothing asked for: an argparse error (status 2)
        export.main([str(world / "boxes.json"), "--images", str(world / "img")])


def test_the_command_streams_a_labels_file_in_any_order(labeled, tmp_path, monkeypatch):
    """export.py reads the labels file through its index, never whole (json.load and json.loads of the
    whole file fail here), and groups by image whatever the file's order: annotations first and
    interleaved across images (each image's in their order, which numbers its instances) give the same
    PNGs, overlays, review sheets and instances.json as the file grouped by image, and coco-polygons
    keeps the file's own key and annotation order, compact as json.dump writes it."""
    out, img_dir, _ = labeled
    seen = collections.Counter()
    nth = [seen.update([a["image_id"]]) or seen[a["image_id"]] for a in out["annotations"]]
    anns = [a for _, a in sorted(zip(nth, out["annotations"]), key=lambda p: (p[0], -p[1]["image_id"]))]
    assert [a["image_id"] for a in anns][:2] == [5, 1]  # image 5's annotation first, then image 1's
    variants = {"ordered": out, "shuffled": {"annotations": anns, **{k: v for k, v in out.items()
                                                                    if k != "annotations"}}}
    whole = lambda *a, **k: pytest.fail("the labels file was read whole")  # noqa: E731
    monkeypatch.setattr(json, "load", whole)
    monkeypatch.setattr(util, "read_json", whole)
    fmts = ["png"] + (["coco-polygons"] if _has_cv2() else [])
    trees = {}
    for name, doc in variants.items():
        d = tmp_path / name
        d.mkdir()
        (d / "labels.json").write_text(json.dumps(doc, indent=2))
        for fmt in fmts:
            dest = d / ("poly.json" if fmt == "coco-polygons" else "png")
            export.main([str(d / "labels.json"), "--images", img_dir, "--format", fmt, "--out", str(dest),
                         "--vis", "3", "--review", "4"])
        trees[name] = {p: v for p, v in _tree(d).items() if not p.startswith(("labels.json", "poly.json"))}
    assert trees["ordered"] == trees["shuffled"]
    assert len([p for p in trees["ordered"] if p.startswith("labels.review")]) == 4
    assert len([p for p in trees["ordered"] if p.startswith("labels.vis")]) == 2  # images 1 and 5 have masks
    if "coco-polygons" in fmts:
        got = {name: (tmp_path / name / "poly.json").read_text() for name in variants}
        parsed = {name: json.JSONDecoder().decode(text) for name, text in got.items()}
        for name, doc in variants.items():
            assert got[name] == json.dumps(parsed[name], separators=(",", ":"))
            assert list(parsed[name]) == list(doc)
            assert [a["id"] for a in parsed[name]["annotations"]] == [a["id"] for a in doc["annotations"]]
        by_id = {a["id"]: a for a in parsed["ordered"]["annotations"]}
        assert all(by_id[a["id"]] == a for a in parsed["shuffled"]["annotations"])


def _has_cv2():
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True

"""SCRFD + ArcFace on onnxruntime, exercised with tiny ONNX models built here.

The tiny "SCRFD" has the real signature (1x3xHxW in, per-stride scores/boxes/keypoints out) and
returns outputs planted by the test, so decoding, thresholding, NMS and rescaling must reproduce
faces chosen in original-image coordinates. The tiny "ArcFace" is a fixed random linear map of
the 8x8-pooled crop, so its output can be predicted from the crop in numpy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fastface.errors import ConfigError, InputError  # noqa: E402
from fastface.faces import scrfd  # noqa: E402
from fastface.faces.align import ARCFACE_TEMPLATE, alignment_matrix, transform_points  # noqa: E402
from fastface.faces.onnx_backend import OnnxFaceBackend, open_session, plan_providers  # noqa: E402

STRIDES = (8, 16, 32)
DET = 64  # tiny detector input: grids 8x8, 4x4, 2x2, two anchors per cell
IMAGE_H, IMAGE_W = 150, 200  # letterboxed into 64x48 at the top-left: scale 48 / 150


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime >= 1.17 reads IR 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def plant_scrfd_outputs(faces, det=DET, kps=True):
    """Raw per-stride arrays holding ``faces``: (stride, cell col, cell row, anchor, score, box, points)."""
    outs = {}
    for stride in STRIDES:
        n = (det // stride) ** 2 * 2
        outs[stride] = [np.full((n, 1), 0.01, np.float32), np.zeros((n, 4), np.float32), np.zeros((n, 10), np.float32)]
    for stride, col, row, anchor, score, box, points in faces:
        index = (row * (det // stride) + col) * 2 + anchor
        cx, cy = col * stride, row * stride
        outs[stride][0][index, 0] = score
        outs[stride][1][index] = np.array([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / stride
        outs[stride][2][index] = ((np.asarray(points) - [cx, cy]) / stride).reshape(-1)
    scores = [outs[s][0] for s in STRIDES]
    boxes = [outs[s][1] for s in STRIDES]
    points = [outs[s][2] for s in STRIDES] if kps else []
    return scores + boxes + points


def make_scrfd(path: Path, outputs, input_shape=(1, 3, DET, DET), batched=False, order=None) -> Path:
    """A graph whose outputs are the planted constants (plus 0 x the input's mean, so the input is read)."""
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for i, arr in enumerate(outputs):
        value = arr[None] if batched else arr
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"planted_{i}"))
        nodes.append(helper.make_node("Add", [f"planted_{i}", "nothing"], [f"out_{i}"]))
        graph_outputs.append(helper.make_tensor_value_info(f"out_{i}", TensorProto.FLOAT, list(value.shape)))
    if order is not None:
        graph_outputs = [graph_outputs[i] for i in order]
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, list(input_shape))],
        graph_outputs, initializer=inits,
    )
    return _save(graph, path)


def arcface_weights(dim=512, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3 * 14 * 14, dim)).astype(np.float32)


def make_arcface(path: Path, weights: np.ndarray, batch="N") -> Path:
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, weights.shape[1]])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return _save(graph, path)


def expected_embedding(crop: np.ndarray, weights: np.ndarray, normalize: bool = True) -> np.ndarray:
    """What the tiny ArcFace returns for an RGB crop fed as (x - 127.5) / 127.5 (L2-normalised by default)."""
    x = (crop.astype(np.float64) - 127.5) / 127.5
    pooled = x.reshape(14, 8, 14, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1)
    out = pooled @ weights.astype(np.float64)
    return out / np.linalg.norm(out) if normalize else out


def face_points(box, angle_deg=0.0) -> np.ndarray:
    """The ArcFace template rotated by ``angle_deg``, scaled to the box width and centred in it."""
    t = ARCFACE_TEMPLATE.astype(np.float64) - 56.0
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    scale = (box[2] - box[0]) / 112.0
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return t @ rot.T * scale + centre


SCALE = 48 / IMAGE_H
# Faces chosen in original-image coordinates; planted in detector-input coordinates (x SCALE).
FACE_A = np.array([37.5, 25.0, 125.0, 112.5])  # stride 8, cell (3, 2), anchor 1, score 0.9
FACE_B = np.array([137.5, 81.25, 187.5, 137.5])  # stride 8, cell (6, 4), anchor 0, score 0.8
DUP_A = np.array([43.75, 31.25, 125.0, 112.5])  # stride 16 duplicate of A (IoU 0.86), score 0.7
FACE_C = np.array([68.75, 87.5, 137.5, 156.25])  # stride 32, low score 0.3
KPS_A, KPS_B = face_points(FACE_A, 12.0), face_points(FACE_B, -8.0)
KPS_DUP, KPS_C = face_points(DUP_A), face_points(FACE_C)


def planted_faces():
    return [
        (8, 3, 2, 1, 0.9, FACE_A * SCALE, KPS_A * SCALE),
        (8, 6, 4, 0, 0.8, FACE_B * SCALE, KPS_B * SCALE),
        (16, 2, 1, 0, 0.7, DUP_A * SCALE, KPS_DUP * SCALE),
        (32, 1, 1, 1, 0.3, FACE_C * SCALE, KPS_C * SCALE),
    ]


def test_face_geometry_is_what_the_tests_assume():
    a, dup = scrfd.box_iou(FACE_A, DUP_A[None])[0], scrfd.box_iou(FACE_A, FACE_C[None])[0]
    assert a > 0.4 > dup
    assert scrfd.box_iou(FACE_A, FACE_B[None])[0] == 0.0


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packs") / "buffalo_l"
    root.mkdir()
    make_scrfd(root / "det_10g.onnx", plant_scrfd_outputs(planted_faces()))
    make_arcface(root / "w600k_r50.onnx", arcface_weights())
    return root


@pytest.fixture(scope="module")
def backend(pack_dir) -> OnnxFaceBackend:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny files are not the published sizes
        return OnnxFaceBackend(pack="buffalo_l", model_dir=pack_dir, providers=["CPUExecutionProvider"], det_size=DET)


# --- pure functions -------------------------------------------------------------------------


def test_anchor_centres_are_cell_corners_repeated_per_anchor():
    c = scrfd.anchor_centers(2, 3, 16, num_anchors=2)
    assert c.shape == (12, 2)
    np.testing.assert_array_equal(c[0], c[1])
    np.testing.assert_array_equal(c[2], [16, 0])
    np.testing.assert_array_equal(c[6], [0, 16])
    np.testing.assert_array_equal(c[-1], [32, 16])


def test_distance_decoding():
    pts = np.array([[10.0, 20.0], [0.0, 0.0]])
    boxes = scrfd.distance2bbox(pts, np.array([[1.0, 2.0, 3.0, 4.0], [0, 0, 5, 5]]))
    np.testing.assert_allclose(boxes, [[9, 18, 13, 24], [0, 0, 5, 5]])
    kps = scrfd.distance2kps(pts, np.tile([[1.0, -1.0]], (2, 5)))
    assert kps.shape == (2, 5, 2)
    np.testing.assert_allclose(kps[0], np.tile([11.0, 19.0], (5, 1)))


def test_nms_keeps_best_of_overlapping_and_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    scores = np.array([0.6, 0.9, 0.5, 0.4])
    keep = scrfd.nms(boxes, scores, 0.4)
    # box 1 suppresses box 0 (IoU 0.81); box 3 overlaps box 0 by 0.5 but box 1 by only 0.39
    assert keep.tolist() == [1, 2, 3]
    assert scrfd.nms(boxes, scores, 0.3).tolist() == [1, 2]
    assert scrfd.nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_letterbox_keeps_aspect_and_places_top_left(image):
    canvas, scale = scrfd.letterbox(image, 64, 64)
    assert canvas.shape == (64, 64, 3) and scale == pytest.approx(48 / 150)
    assert canvas[48:].max() == 0 and canvas[:48].max() > 0
    tall, scale_t = scrfd.letterbox(image.transpose(1, 0, 2), 64, 64)
    assert scale_t == pytest.approx(64 / 200) and tall[:, 48:].max() == 0


def test_bilinear_resize_matches_opencv_inter_linear(image):
    cv2 = pytest.importorskip("cv2")
    for w, h in [(64, 48), (311, 233), (37, 91)]:
        ours = scrfd.resize_bilinear(image, w, h).astype(int)
        ref = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(int)
        assert np.abs(ours - ref).max() <= 1


def test_blob_is_rgb_nchw_normalised():
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 255
    blob = scrfd.to_blob(img)
    assert blob.shape == (1, 3, 2, 2) and blob.dtype == np.float32
    np.testing.assert_allclose(blob[0, :, 0, 0], [127.5 / 128, -127.5 / 128, -127.5 / 128])


def test_decode_postprocess_recover_planted_faces():
    outs = plant_scrfd_outputs(planted_faces())
    boxes, scores, kps = scrfd.decode(outs, DET, DET, threshold=0.5)
    assert sorted(scores.tolist()) == pytest.approx([0.7, 0.8, 0.9])
    b, s, k = scrfd.postprocess(boxes, scores, kps, SCALE, IMAGE_H, IMAGE_W)
    np.testing.assert_allclose(b, [FACE_A, FACE_B], atol=1e-3)
    np.testing.assert_allclose(k, [KPS_A, KPS_B], atol=1e-3)
    assert s.tolist() == pytest.approx([0.9, 0.8])
    # a lower threshold lets the weak face through; NMS still removes the duplicate
    b, s, _ = scrfd.postprocess(*scrfd.decode(outs, DET, DET, threshold=0.2), SCALE, IMAGE_H, IMAGE_W)
    np.testing.assert_allclose(b, [FACE_A, FACE_B, FACE_C], atol=1e-3)
    # max_num keeps the largest, most central face, not the best-scoring order
    b, _, _ = scrfd.postprocess(*scrfd.decode(outs, DET, DET, threshold=0.2), SCALE, IMAGE_H, IMAGE_W, max_num=1)
    np.testing.assert_allclose(b, [FACE_A], atol=1e-3)


def test_decode_accepts_batch_dim_any_order_and_no_keypoints():
    outs = plant_scrfd_outputs(planted_faces())
    ref = scrfd.decode(outs, DET, DET)
    shuffled = [outs[i][None] for i in (8, 2, 4, 0, 6, 1, 5, 3, 7)]
    got = scrfd.decode(shuffled, DET, DET)
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)
    no_kps = scrfd.decode(plant_scrfd_outputs(planted_faces(), kps=False), DET, DET)
    np.testing.assert_array_equal(no_kps[0], ref[0])
    assert no_kps[2] is None


def test_decode_rejects_outputs_of_the_wrong_size():
    outs = plant_scrfd_outputs(planted_faces())
    with pytest.raises(ConfigError, match="96x96"):
        scrfd.decode(outs, 96, 96)
    with pytest.raises(ConfigError, match="channels"):
        scrfd.decode([np.zeros((128, 3))], DET, DET)


# --- detector on onnxruntime ----------------------------------------------------------------


def test_detector_on_onnxruntime_static_input(tmp_path, image):
    path = make_scrfd(tmp_path / "det.onnx", plant_scrfd_outputs(planted_faces()))
    det = scrfd.ScrfdDetector(str(path), ["CPUExecutionProvider"])
    assert det.fixed_size == (DET, DET) and det.has_keypoints
    boxes, scores, kps = det.detect(image, det_size=640)  # a fixed-size model ignores det_size
    np.testing.assert_allclose(boxes, [FACE_A, FACE_B], atol=1e-3)
    np.testing.assert_allclose(kps, [KPS_A, KPS_B], atol=1e-3)
    assert det.detect(image, threshold=0.95)[0].shape == (0, 4)


def test_detector_dynamic_input_batched_outputs_and_six_outputs(tmp_path, image):
    outs = plant_scrfd_outputs(planted_faces())
    path = make_scrfd(tmp_path / "dyn.onnx", outs, input_shape=("n", 3, "h", "w"), batched=True)
    det = scrfd.ScrfdDetector(str(path), ["CPUExecutionProvider"], det_size=DET)
    assert det.fixed_size is None and det.input_size() == (DET, DET)
    np.testing.assert_allclose(det.detect(image)[0], [FACE_A, FACE_B], atol=1e-3)
    with pytest.raises(ConfigError, match="96x96"):
        det.detect(image, det_size=96)  # the planted outputs are for a 64x64 input
    with pytest.raises(ConfigError, match="multiple of 32"):
        det.detect(image, det_size=100)
    path6 = make_scrfd(tmp_path / "six.onnx", plant_scrfd_outputs(planted_faces(), kps=False))
    det6 = scrfd.ScrfdDetector(str(path6), ["CPUExecutionProvider"])
    boxes, _, kps = det6.detect(image)
    assert not det6.has_keypoints and kps is None
    np.testing.assert_allclose(boxes, [FACE_A, FACE_B], atol=1e-3)


# --- backend end to end ----------------------------------------------------------------------


def test_backend_detect_align_embed(backend, image):
    assert backend.name == "buffalo_l" and backend.embedding_dim == 512
    assert backend.det_sizes == (DET,)  # a fixed-size detector is not retried at other sizes
    assert backend.model_id.startswith("buffalo_l/w600k_r50-")  # not the published file: own cache key
    assert "non-commercial" in backend.licence
    faces = backend.detect(image)
    assert [round(f.score, 3) for f in faces] == [0.9, 0.8]
    np.testing.assert_allclose(faces[0].bbox, FACE_A, atol=1e-3)
    np.testing.assert_allclose(faces[1].keypoints, KPS_B, atol=1e-3)
    weights = arcface_weights()
    embeddings = []
    for face in faces:
        emb = backend.embed(image, face)
        assert emb.shape == (512,) and emb.dtype == np.float32
        assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_array_equal(emb, backend.embed(image, face))  # deterministic
        crop = backend.aligned_crop(image, face)
        np.testing.assert_allclose(emb, expected_embedding(crop, weights), atol=1e-5)
        embeddings.append(emb)
    assert float(embeddings[0] @ embeddings[1]) < 0.9


def test_backend_channel_order_matters(backend, image):
    """The recogniser must receive the crop as RGB: feeding BGR would give another embedding."""
    face = backend.detect(image)[0]
    crop = backend.aligned_crop(image, face)
    bgr = expected_embedding(crop[..., ::-1], arcface_weights())
    assert float(backend.embed(image, face) @ bgr) < 0.99


def test_alignment_puts_keypoints_on_the_template(backend):
    """Bright dots at the planted keypoints land on ARCFACE_TEMPLATE in the 112 crop (< 0.5 px)."""
    yy, xx = np.mgrid[:IMAGE_H, :IMAGE_W]
    canvas = np.zeros((IMAGE_H, IMAGE_W), np.float64)
    for x, y in KPS_A:
        canvas += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    img = np.repeat((np.clip(canvas, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    face = backend.detect(img)[0]
    matrix = alignment_matrix(face.keypoints, 112)
    assert np.abs(transform_points(matrix, face.keypoints) - ARCFACE_TEMPLATE).max() < 0.5
    crop = backend.aligned_crop(img, face)[..., 0].astype(np.float64)
    cy, cx = np.mgrid[:112, :112]
    for tx, ty in ARCFACE_TEMPLATE:
        window = (np.abs(cx - tx) < 6) & (np.abs(cy - ty) < 6)
        w = crop * window
        centroid = np.array([(w * cx).sum(), (w * cy).sum()]) / w.sum()
        assert np.abs(centroid - [tx, ty]).max() < 0.5


def test_backend_rejects_detector_without_keypoints_and_bad_input(tmp_path, pack_dir, backend, image):
    d = tmp_path / "buffalo_l"
    d.mkdir()
    make_scrfd(d / "det_10g.onnx", plant_scrfd_outputs(planted_faces(), kps=False))
    (d / "w600k_r50.onnx").write_bytes((pack_dir / "w600k_r50.onnx").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="without keypoints"):
            OnnxFaceBackend(model_dir=d, providers="cpu", det_size=DET)
    with pytest.raises(InputError, match="RGB"):
        backend.detect(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(InputError, match="uint8"):
        backend.detect(image.astype(np.float32))


def test_backend_through_the_registry(pack_dir, image):
    from fastface.faces import get_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = get_backend("arcface", model_dir=pack_dir, providers="cpu", det_size=DET)
    assert isinstance(b, OnnxFaceBackend) and b.name == "buffalo_l"
    assert len(b.detect(image)) == 2


def test_recogniser_reads_embedding_dim_from_the_model(tmp_path, pack_dir):
    d = tmp_path / "antelopev2"
    d.mkdir()
    (d / "scrfd_10g_bnkps.onnx").write_bytes((pack_dir / "det_10g.onnx").read_bytes())
    make_arcface(d / "glintr100.onnx", arcface_weights(dim=128, seed=3), batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = OnnxFaceBackend(pack="antelopev2", model_dir=tmp_path, providers="cpu", det_size=DET)
    assert b.embedding_dim == 128 and b.name == "antelopev2"
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    out = b.recognizer.embed_crops(crops)  # batch fixed to 1: run one by one
    assert out.shape == (3, 128)
    np.testing.assert_allclose(out[1], expected_embedding(crops[1], arcface_weights(dim=128, seed=3)), atol=1e-5)


# --- providers --------------------------------------------------------------------------------


def test_plan_providers():
    avail = ["CPUExecutionProvider"]
    assert plan_providers(None, avail) == (["CPUExecutionProvider"], [])
    assert plan_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert plan_providers("cuda", avail) == (["CPUExecutionProvider"], ["CUDAExecutionProvider"])
    opts = ("CUDAExecutionProvider", {"device_id": 0})
    assert plan_providers([opts], ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == [
        opts, "CPUExecutionProvider"]


def test_asking_for_cuda_here_falls_back_to_cpu_with_a_warning(pack_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback is what this test checks")
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider.*CPUExecutionProvider"):
        session = open_session(pack_dir / "w600k_r50.onnx", ["CUDAExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny files: size warning
        with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider"):
            b = OnnxFaceBackend(model_dir=pack_dir, providers="cuda", det_size=DET)
    assert b.providers == ["CPUExecutionProvider"]


def test_broken_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(InputError, match="cannot load ONNX model"):
        open_session(bad, "cpu")


def test_analyze_uses_the_onnx_backend(backend, image):
    """fastface.faces.analyze on this backend: the largest face, embedded as the backend embeds it."""
    from fastface.faces import analyze

    with pytest.warns(UserWarning, match="2 faces"):
        face = analyze(image, backend)
    np.testing.assert_allclose(face.bbox, FACE_A, atol=1e-3)
    np.testing.assert_allclose(face.embedding, backend.embed(image, backend.detect(image)[0]), atol=1e-6)


def test_raw_embedding_is_the_recognisers_output_before_normalisation(backend, image):
    """InstantID reads InsightFace's un-normalised ``face.embedding``: analyze keeps it as embedding × norm."""
    from fastface.faces import analyze, build_identity

    face = backend.detect(image)[0]
    raw = backend.embed_raw(image, face)
    expected = expected_embedding(backend.aligned_crop(image, face), arcface_weights(), normalize=False)
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-2  # really not normalised
    with pytest.warns(UserWarning, match="2 faces"):
        analysed = analyze(image, backend)
    np.testing.assert_array_equal(analysed.embedding, backend.embed(image, face))
    np.testing.assert_allclose(analysed.raw_embedding, raw, rtol=1e-6)
    with pytest.warns(UserWarning, match="2 faces"):
        identity = build_identity(image, backend, cache=False, progress=False)
    np.testing.assert_allclose(identity.raw_embeddings[0], raw, rtol=1e-6)
    assert identity.image_sizes == [(image.shape[1], image.shape[0])]

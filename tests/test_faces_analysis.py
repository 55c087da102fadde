import io
import warnings

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageEnhance

from fastface.errors import ConfigError, InputError, NoFaceError
from fastface.faces import (
    EmbeddingCache,
    analyze,
    available_backends,
    build_identity,
    get_backend,
    load_embedding,
)
from fastface.faces.dlib_backend import DlibBackend


@pytest.fixture(scope="module")
def dlib_backend():
    return get_backend("dlib")


@pytest.fixture(scope="module")
def facenet_backend():
    return get_backend("facenet")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def variants(image: np.ndarray) -> dict[str, np.ndarray]:
    """The same photo flipped, recoloured (hue + contrast), JPEG-compressed and downscaled."""
    pil = Image.fromarray(image)
    hsv = np.asarray(pil.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + 20) % 256
    recoloured = ImageEnhance.Contrast(Image.fromarray(hsv, "HSV").convert("RGB")).enhance(1.4)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=25)
    return {
        "flipped": np.ascontiguousarray(image[:, ::-1]),
        "recoloured": np.asarray(recoloured),
        "jpeg": np.asarray(Image.open(buf).convert("RGB")),
        "downscaled": np.asarray(pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.LANCZOS)),
    }


@pytest.mark.parametrize("name", ["dlib", "facenet"])
def test_same_person_is_closer_than_other_people(name, astronaut, hopper, request):
    # The cameraman's three-quarter face needs a lower HOG margin than dlib's default.
    backend = get_backend("dlib", threshold=-0.3) if name == "dlib" else request.getfixturevalue("facenet_backend")
    reference = analyze(astronaut, backend).embedding
    cameraman = analyze(skimage.data.camera(), backend).embedding
    others = {"hopper": float(reference @ analyze(hopper, backend).embedding),
              "cameraman": float(reference @ cameraman)}
    same = {k: float(reference @ analyze(v, backend).embedding) for k, v in variants(astronaut).items()}
    assert min(same.values()) > max(others.values()), (same, others)
    assert reference.shape == (backend.embedding_dim,)
    assert np.linalg.norm(reference) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["dlib", "facenet"])
def test_cat_has_no_face(name, request, tmp_path):
    backend = request.getfixturevalue(f"{name}_backend")
    path = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    with pytest.raises(NoFaceError, match=f"no face found in '{path}'"):
        analyze(path, backend)


def test_keypoints_land_on_the_face(dlib_backend, facenet_backend, astronaut):
    for backend in (dlib_backend, facenet_backend):
        face = analyze(astronaut, backend)
        left_eye, right_eye, nose, mouth_left, mouth_right = face.keypoints
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
        x0, y0, x1, y1 = face.bbox
        assert (face.keypoints[:, 0] > x0).all() and (face.keypoints[:, 0] < x1).all()
        # dlib and MTCNN agree on where the eyes are, to a few pixels.
    eyes = [analyze(astronaut, b).keypoints[:2] for b in (dlib_backend, facenet_backend)]
    assert np.abs(eyes[0] - eyes[1]).max() < 6


def test_exif_rotated_jpeg_is_found_upright(dlib_backend, astronaut, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned clockwise; viewers turn it back counter-clockwise
    path = tmp_path / "sideways.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut, k=-1))).save(path, quality=95, exif=exif)
    upright = analyze(astronaut, dlib_backend)
    face = analyze(path, dlib_backend)
    assert np.abs(face.keypoints - upright.keypoints).max() < 4
    with pytest.raises(NoFaceError):  # the stored (sideways) pixels hold no upright face
        analyze(np.asarray(Image.open(path)), dlib_backend)


@pytest.mark.parametrize("kind", ["rgba", "grey", "cmyk", "png16"])
def test_every_input_kind_finds_the_face(kind, dlib_backend, astronaut, tmp_path):
    pil = Image.fromarray(astronaut)
    if kind == "rgba":
        src = pil.convert("RGBA")
    elif kind == "grey":
        src = np.asarray(pil.convert("L"))
    elif kind == "cmyk":
        src = tmp_path / "cmyk.jpg"
        pil.convert("CMYK").save(src, quality=95)
    else:
        src = tmp_path / "g16.png"
        Image.fromarray(np.asarray(pil.convert("L")).astype(np.uint16) * 257).save(src)
    face = analyze(src, dlib_backend)
    reference = analyze(astronaut, dlib_backend)
    assert np.abs(face.bbox - reference.bbox).max() < 8
    assert float(face.embedding @ reference.embedding) > 0.95


def test_very_large_image_is_detected_in_original_coordinates(dlib_backend, astronaut):
    factor = 6000 / 512
    big = np.asarray(Image.fromarray(astronaut).resize((6000, 6000), Image.Resampling.BILINEAR))
    face = analyze(big, dlib_backend)
    reference = analyze(astronaut, dlib_backend)
    assert np.abs(face.keypoints / factor - reference.keypoints).max() < 3
    assert float(face.embedding @ reference.embedding) > 0.97


def test_tiny_close_up_is_upscaled_and_padded(dlib_backend, facenet_backend, astronaut):
    close_up = np.asarray(Image.fromarray(astronaut[60:190, 160:285]).resize((64, 64), Image.Resampling.LANCZOS))
    reference = analyze(astronaut, dlib_backend).embedding
    for backend in (dlib_backend, facenet_backend):
        face = analyze(close_up, backend)
        assert ((face.keypoints >= 0) & (face.keypoints < 64)).all()
    assert float(analyze(close_up, dlib_backend).embedding @ reference) > 0.93


def test_several_faces_warn_and_the_largest_wins(dlib_backend, astronaut, hopper):
    scaled = np.asarray(Image.fromarray(hopper).resize((int(hopper.shape[1] * 512 / hopper.shape[0]), 512)))
    pair = np.concatenate([astronaut, scaled], axis=1)  # astronaut left (small face), Hopper right (large)
    with pytest.warns(UserWarning, match=r"2 faces found.*face #1"):
        largest = analyze(pair, dlib_backend)
    assert largest.bbox[0] > 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        left = analyze(pair, dlib_backend, select=0)
    assert left.bbox[2] < 512
    assert float(left.embedding @ analyze(astronaut, dlib_backend).embedding) > 0.97
    with pytest.raises(InputError, match="face index 5 is out of range: 2 face"):
        analyze(pair, dlib_backend, select=5)


def test_astronaut_variants_combine(dlib_backend, astronaut):
    photos = [astronaut, *variants(astronaut).values()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        identity = build_identity(photos, dlib_backend, cache=False, progress=False)
    assert identity.embeddings.shape == (5, 128) and identity.outliers == []
    assert min(identity.similarities) > 0.95
    assert len(identity.crops) == 5 and all(c.shape == (224, 224, 3) for c in identity.crops)
    assert np.linalg.norm(identity.embedding) == pytest.approx(1.0, abs=1e-5)
    # Aligned crops of the half-size copy match those of the original, pixel for pixel roughly.
    crops = np.stack(identity.crops).astype(float)
    assert np.abs(crops[0] - crops[4]).mean() < 12
    assert np.abs(crops[0] - np.roll(crops[4], 10, axis=1)).mean() > 2 * np.abs(crops[0] - crops[4]).mean()


def test_a_different_person_is_flagged_or_rejected(dlib_backend, facenet_backend, astronaut, hopper, tmp_path):
    vs = variants(astronaut)
    photos = [astronaut, vs["recoloured"], vs["jpeg"], hopper]
    with pytest.warns(UserWarning, match="may be a different person"):
        identity = build_identity(photos, dlib_backend, cache=False, progress=False)
    assert identity.outliers == [identity.sources[3]]
    assert np.argmin(identity.similarities) == 3
    clean = build_identity(photos[:3], dlib_backend, cache=False, progress=False)
    assert float(identity.embedding @ clean.embedding) > 0.999  # the outlier is left out of the mean
    path = tmp_path / "hopper.png"
    Image.fromarray(hopper).save(path)
    with pytest.raises(InputError, match=rf"'{path}' does not look like the same person .*similarity 0\.\d\d"):
        build_identity([*photos[:3], path], facenet_backend, cache=False, progress=False)


class CountingDlib(DlibBackend):
    def __init__(self) -> None:
        super().__init__()
        self.detect_calls = 0

    def detect(self, image, *, det_size=None):
        self.detect_calls += 1
        return super().detect(image, det_size=det_size)


def test_second_run_hits_the_cache(astronaut, tmp_path):
    backend = CountingDlib()
    paths = []
    for i, photo in enumerate([astronaut, variants(astronaut)["jpeg"]]):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(photo).save(paths[-1])
    cache = EmbeddingCache(tmp_path / "cache")
    first = build_identity(paths, backend, cache=cache, progress=False)
    assert (cache.hits, cache.misses, backend.detect_calls) == (0, 2, 2)
    second = build_identity(paths, backend, cache=cache, progress=False)
    assert (cache.hits, backend.detect_calls) == (2, 2)
    assert np.array_equal(first.embeddings, second.embeddings)
    assert np.array_equal(first.keypoints[1], second.keypoints[1])
    # dlib exposes its raw descriptor: kept (as embedding × norm) through the cache
    assert first.raw_embeddings is not None and np.array_equal(first.raw_embeddings, second.raw_embeddings)
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    face = backend.detect(img)[0]
    np.testing.assert_allclose(first.raw_embeddings[0], backend.embed_raw(img, face), rtol=1e-5, atol=1e-6)
    assert first.image_sizes[0] == (img.shape[1], img.shape[0])
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    other = EmbeddingCache(tmp_path / "cache")
    build_identity(paths[0], backend, select=0, cache=other, progress=False)  # another key: recomputed
    assert (other.hits, other.misses) == (0, 1)


def test_a_cached_analysis_still_warns_about_the_other_faces(astronaut, hopper, tmp_path):
    backend = CountingDlib()
    scaled = np.asarray(Image.fromarray(hopper).resize((int(hopper.shape[1] * 512 / hopper.shape[0]), 512)))
    path = tmp_path / "pair.png"
    Image.fromarray(np.concatenate([astronaut, scaled], axis=1)).save(path)
    cache = EmbeddingCache(tmp_path / "cache")
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"2 faces found in '.*pair.png'; using face #1"):
            identity = build_identity(path, backend, cache=cache, progress=False)
        assert identity.keypoints[0][:, 0].min() > 512  # Hopper, the larger face, both times
    assert (cache.hits, cache.misses, backend.detect_calls) == (1, 1, 1)  # the second run did not detect
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chosen index is the user's decision: no warning, cached or not
        for _ in range(2):
            build_identity(path, backend, select=1, cache=cache, progress=False)


def test_load_embedding_npy_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    vec = rng.normal(size=512).astype(np.float32)
    np.save(tmp_path / "one.npy", vec)
    identity = load_embedding(tmp_path / "one.npy")
    assert identity.dim == 512 and np.allclose(identity.embedding, vec / np.linalg.norm(vec), atol=1e-6)
    rows = rng.normal(size=(3, 128)).astype(np.float32)
    save_file({"embedding": rows, "other": vec}, str(tmp_path / "id.safetensors"), metadata={"backend": "dlib"})
    loaded = load_embedding(tmp_path / "id.safetensors")
    assert loaded.num_photos == 3 and loaded.backend == "dlib"
    save_file({"x": vec}, str(tmp_path / "single.safetensors"))
    assert load_embedding(tmp_path / "single.safetensors").dim == 512
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"nonsense")
    for bad, pattern in [("cube.npy", "shape"), ("junk.npy", "unreadable"), ("none.npy", "does not exist")]:
        with pytest.raises(InputError, match=pattern):
            load_embedding(tmp_path / bad)


def test_registry_errors_and_availability():
    with pytest.raises(ConfigError, match="unknown face backend 'nope'.*dlib, facenet, arcface"):
        get_backend("nope")
    with pytest.raises(ConfigError, match="detector"):
        get_backend("dlib", detector="sift")
    status = available_backends()
    assert status["dlib"] == "ready" and status["facenet"] == "ready"
    assert set(status) >= {"arcface", "buffalo_l", "antelopev2", "auraface"}


def test_dlib_cnn_detector_with_five_point_landmarks(dlib_backend, astronaut):
    from fastface.errors import MissingWeightsError
    from fastface.faces.dlib_backend import MODEL_FILES, models_dir

    if not (models_dir() / MODEL_FILES["cnn"]).is_file():
        # face-recognition-models 0.1.3 (the wheel CI installs) lacks these files: the error must say so.
        with pytest.raises(MissingWeightsError, match="face-recognition-models>=0.3"):
            get_backend("dlib", detector="cnn", landmarks=5, upsample=0)
        return
    backend = get_backend("dlib", detector="cnn", landmarks=5, upsample=0)
    face = analyze(astronaut, backend)
    reference = analyze(astronaut, dlib_backend)
    assert face.landmarks.shape == (5, 2) and reference.landmarks.shape == (68, 2)
    assert np.abs(face.keypoints[:2] - reference.keypoints[:2]).max() < 5  # eye centres, image-left first
    # The 5-point model has no mouth: its corners are estimated from a frontal template, which this
    # broadly smiling face departs from (measured 19 px, 0.44 of the eye distance, too low).
    eye_distance = float(np.linalg.norm(reference.keypoints[1] - reference.keypoints[0]))
    assert np.abs(face.keypoints[3:] - reference.keypoints[3:]).max() < 0.5 * eye_distance
    assert float(face.embedding @ reference.embedding) > 0.97


def test_pose_from_photo_gives_keypoints_and_size(dlib_backend, astronaut):
    from fastface.faces import pose_from_photo

    pose = pose_from_photo(astronaut, dlib_backend)
    assert pose.size == (astronaut.shape[1], astronaut.shape[0])
    np.testing.assert_allclose(pose.keypoints, analyze(astronaut, dlib_backend).keypoints)
    with pytest.raises(NoFaceError, match="pose photo"):
        pose_from_photo(skimage.data.chelsea(), dlib_backend)

"""Messages in the user's language: CLI flags under the CLI, one ``warning:`` line per library
warning, findings on options that change nothing, outlier numbers with enough digits."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from fastface.advice import ineffective_options
from fastface.errors import InputError
from fastface.faces import build_identity
from fastface.guidance import GuidanceConfig
from fastface.messages import quiet_loading, to_cli
from fastface.presets import get_method, plain_cfg


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(astronaut[:, ::-1]).save(folder / "flipped.png")
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        (folder / "hopper.jpg").write_bytes(fh.read())
    hopper = np.asarray(Image.open(folder / "hopper.jpg").convert("RGB").resize((512, 512)))
    Image.fromarray(np.concatenate([astronaut, hopper], axis=1)).save(folder / "two.png")
    return folder


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FASTFACE_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "fastface.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_to_cli_rewrites_keywords_as_flags():
    assert to_cli("or pass base_model=<local folder>") == "or pass --base-model <local folder>"
    assert to_cli("pass select=<index> to choose another") == "pass --select <index> to choose another"
    assert to_cli("set cpu_offload=True to save memory") == "set --cpu-offload to save memory"
    assert to_cli("use reject_threshold=0.8512 (Python: model_dir=) now") == "use --reject-threshold 0.8512 now"
    assert to_cli("a\nb") == "a b" and to_cli("nothing_here=1 stays") == "nothing_here=1 stays"


def test_generate_select_reaches_the_face_choice(photos):
    # (The warnings of a full generate run in CLI terms are checked in test_sampler.py, on one run.)
    out_of_range = _cli(photos, "generate", "--face", "two.png", "--select", "5", "--prompt", "p",
                        "--backbone", "tiny", "--out", "never")
    assert out_of_range.returncode == 2
    assert out_of_range.stderr.strip() == "error: face index 5 is out of range: 2 face(s) found in 'two.png'"


def test_ineffective_options_are_found_and_effective_ones_are_not():
    none, fastface, dcg = get_method("none"), get_method("fastface"), get_method("dcg")
    cfg_free = ineffective_options(method=none, guidance=plain_cfg(1.0), steps=4, adapter=None,
                                   given={"negative_prompt": "x", "rescale": 0.5, "am_power": 2.0, "ip_scale": 1.0})
    assert [f.option for f in cfg_free] == ["negative_prompt", "rescale", "am_power", "ip_scale"]
    assert cfg_free[2].message(cli=False).startswith("am_power has no effect: method none has no attention")
    assert cfg_free[3].message(cli=True) == "--ip-scale has no effect: no identity adapter is loaded"
    # Stock CFG 5 and decoupled guidance both evaluate the negative text: nothing to say.
    assert ineffective_options(method=none, guidance=plain_cfg(5.0), steps=4, adapter=None,
                               given={"negative_prompt": "x"}) == []
    assert ineffective_options(method=fastface, guidance=GuidanceConfig(), steps=4, adapter=object(),
                               given={"negative_prompt": "x", "am_power": 2.0}) == []
    embedding = ineffective_options(method=dcg, guidance=GuidanceConfig(), steps=4, adapter=object(),
                                    given={"select": 1, "am_power": 2.0}, face_is_embedding=True)
    assert [f.option for f in embedding] == ["am_power", "select"]


def test_outlier_numbers_have_four_digits_and_the_override_keeps_the_photo(photos):
    paths = [photos / "astronaut.png", photos / "flipped.png", photos / "hopper.jpg"]
    with pytest.warns(UserWarning) as caught:
        identity = build_identity(paths, backend="dlib", cache=False, progress=False)
    message = str(caught[0].message)
    assert identity.outliers == [str(paths[2])]
    assert "< 0.9200 to the other photos under dlib" in message
    suggested = float(message.split("outlier_threshold=")[1].split(" ")[0].rstrip(")"))
    sim = identity.similarities[2]
    assert f"(similarity {sim:.4f} " in message and suggested < sim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = build_identity(paths, backend="dlib", cache=False, progress=False, outlier_threshold=suggested)
    assert kept.outliers == []
    with pytest.raises(InputError, match=r"similarity 0\.\d{4} < 0\.9500 under dlib\); leave it out, or pass "
                                         r"reject_threshold=0\.\d{4} to use it anyway"):
        build_identity(paths, backend="dlib", cache=False, progress=False, reject_threshold=0.95,
                       outlier_threshold=0.95)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_loading_hides_only_the_known_benign_notices():
    library = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root
    collect = _Collect()
    library.addHandler(collect)
    try:
        logger = logging.getLogger("diffusers.loaders.lora_pipeline")
        with quiet_loading():
            logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
            logger.warning("something that matters")
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
    finally:
        library.removeHandler(collect)
    assert collect.messages == ["something that matters",
                                "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'."]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_loading():
            warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning, stacklevel=1)
        warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning, stacklevel=1)
    assert len(caught) == 1  # silenced inside the block only


def test_library_hints_reach_the_cli_as_flags(tmp_path):
    np.save(tmp_path / "face.npy", np.random.default_rng(0).standard_normal(128).astype(np.float32))
    proc = _cli(tmp_path, "generate", "--face", "face.npy", "--prompt", "p", "--backbone", "tiny", "--device", "cpu",
                "--cpu-offload", "--out", "out")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --cpu-offload needs a CUDA device (the pipeline's device is cpu)"

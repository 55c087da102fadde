"""Damaged weights files the user names are one line (``error: ...``), never a traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fastface.errors import InputError
from fastface.hub import check_weights_file, read_weights


def _header_too_large(path):
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # claims a 1 TB header
    return path


@pytest.mark.parametrize("option", ["--adapter-path", "--lora"])
def test_malformed_safetensors_given_to_generate_is_one_line(tmp_path, option):
    bad = _header_too_large(tmp_path / "broken.safetensors")
    np.save(tmp_path / "face.npy", np.random.default_rng(0).standard_normal(128).astype(np.float32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastface.cli", "generate", "--face", "face.npy", "--prompt", "p",
                           "--backbone", "tiny", option, str(bad), "--out", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {option}: '{bad}' is not a readable .safetensors file "
                                   "(Error while deserializing header: header too large)")
    assert not (tmp_path / "out").exists()


def test_library_readers_refuse_damaged_files(tmp_path):
    with pytest.raises(InputError, match="adapter checkpoint: .* is not a readable .safetensors file .*header too large"):
        read_weights(_header_too_large(tmp_path / "a.safetensors"), what="adapter checkpoint")
    truncated = tmp_path / "b.bin"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"UNet: cannot read '.*b\.bin' \("):
        read_weights(truncated, what="UNet")
    empty = tmp_path / "c.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="not a readable .safetensors file"):
        check_weights_file(empty, what="LoRA")

import shutil
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo sentencepiece tokenizer, trained once per test session."""
    from edgellm.engine.demo_tokenizer import train_demo_tokenizer

    path = tmp_path_factory.mktemp("demo-tokenizer")
    train_demo_tokenizer(path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory) -> Path:
    """The demo INT4-AWQ engine (max batch 4, max seq len 512), built once per test session."""
    from edgellm.engine.demo import build_demo_engine

    out = tmp_path_factory.mktemp("engines") / "demo"
    build_demo_engine(out, progress=lambda _msg: None)
    return out


def copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, dest / f.name)

"""`lstm-export` in the [export] environment (the training stack blocked from import, in a fresh
interpreter): `config` works, the training commands name the extra they need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tests.unit.test_starter import export_torch_lstm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def torch_lstm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's torch LSTM exported by torch.onnx.export (states h0/c0 in, hn/cn out)."""
    return export_torch_lstm(tmp_path_factory.mktemp("starter") / "model.onnx")


# Run first in a subprocess: the training stack cannot be imported (as in the [export]
# environment, which lacks it); torch's own optional `import tqdm` then falls back as it does there.
BLOCK_TRAINING_STACK = """
import sys
# What [train] adds to [export] (pip install --dry-run --report of each), the main ones.
TRAINING_ONLY = ('aeon', 'tqdm', 'sklearn', 'scipy', 'pandas', 'numba')
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in TRAINING_ONLY:
            raise ImportError('the [export] environment has no ' + name)
sys.meta_path.insert(0, _Block())
"""


def test_config_command_prints_it_without_the_training_stack(torch_lstm: Path) -> None:
    code = BLOCK_TRAINING_STACK + (
        "from export.cli import main\n"
        f"rc = main(['config', {str(torch_lstm)!r}])\n"
        "import export.from_torch, export.verify\n"
        "print('RC', rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text, rc = done.stdout.rsplit("RC", 1)
    assert rc.strip() == "0"
    config = text_format.Parse(text, mc.ModelConfig())
    assert len(config.sequence_batching.state) == 2


def test_training_commands_say_which_extra_they_need_in_the_export_environment() -> None:
    code = BLOCK_TRAINING_STACK + (
        "from export.cli import main\n"
        "print('RC', main(['train', 'speaker-vowels', '--out', 'unused']),"
        " main(['crossval', 'speaker-vowels']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "RC 2 2", done.stderr[-2000:]
    assert "lstm-export train needs the training extra (pip install -e '.[train]')" in done.stderr
    assert "lstm-export crossval needs the training extra" in done.stderr

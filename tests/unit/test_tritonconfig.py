"""config.pbtxt: parsed into tritonclient's ModelConfig, refused by field name, checked against
the ONNX graph; the generic runtime on real torch exports of every shape it takes."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from service.engine.byo.binding import BoundState
from service.engine.byo.generic import GenericRuntime, StateLayout
from service.engine.byo.tritonconfig import StateSpec, TritonModel
from service.engine.compute.runtime import ModelRuntime
from service.engine.schedule.batcher import InflightCounter
from service.engine.schedule.pending import Pending, PendingChunks
from service.engine.types import BatchPolicy, probabilities
from service.errors import ConfigError, InvalidInput
from service.tritonconfig import (
    TritonConfigReader,
    load_triton_config,
    parse_config,
    unsupported_fields,
)
from tests.unit.engines import load_worker

CPU = ("CPUExecutionProvider",)
GOOD = """
name: "m"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 2500000
  direct { max_queue_delay_microseconds: 300 }
  state [ { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 1, 4 ] } ]
}
instance_group [ { kind: KIND_CPU } ]
parameters { key: "vocab_size" value: { string_value: "10" } }
"""


def write_config(tmp_path: Path, text: str, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text, encoding="utf-8")
    return folder


def refusal(tmp_path: Path, text: str, name: str = "m") -> str:
    with pytest.raises(ConfigError) as refused:
        load_triton_config(write_config(tmp_path, text, name))
    return str(refused.value)


# -- the config alone ---------------------------------------------------------------------------


def test_oldest_caps_the_batch_at_its_candidates_and_preferred_sizes(tmp_path: Path) -> None:
    oldest = "oldest { preferred_batch_size: [ 4, 32 ] max_candidate_sequences: 16 "
    text = GOOD.replace("direct { max_queue_delay_microseconds: 300 }", oldest + "}")
    assert load_triton_config(write_config(tmp_path, text)).batch_cap == 16
    text = text.replace("max_candidate_sequences: 16", "preserve_ordering: true")
    assert load_triton_config(write_config(tmp_path, text)).batch_cap == 32


def test_instance_count_is_the_batches_run_at_once(tmp_path: Path) -> None:
    from service.engine.model.worker import triton_policy

    text = GOOD.replace("kind: KIND_CPU }", "kind: KIND_CPU count: 3 }")
    triton = load_triton_config(write_config(tmp_path, text))
    policy = triton_policy(triton, BatchPolicy(max_concurrent=1, max_batch_size=256))
    assert (policy.max_concurrent, policy.max_batch_size, policy.max_queue_delay_s) == (
        3,
        8,
        0.0003,
    )


def test_a_good_config_maps_onto_the_servers_settings(tmp_path: Path) -> None:
    triton = load_triton_config(write_config(tmp_path, GOOD))
    assert triton.config.name == "m" and triton.max_batch_size == 8
    assert triton.idle_timeout_s == 2.5 and triton.queue_delay_s == 0.0003
    assert triton.instance_kind == "KIND_CPU"
    assert triton.output_kind is None  # not set: the graph says (service/engine/byo/inferred.py)
    assert [(s.input_name, s.output_name, s.dims) for s in triton.states] == [
        ("h_in", "h_out", (1, 4))
    ]
    assert triton.parameters == {"vocab_size": "10"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("response_cache { enable: true }", "response_cache"),
        ('default_model_filename: "other.onnx"', "default_model_filename"),
        ("optimization { priority: PRIORITY_MAX }", "optimization"),
        ('model_warmup [ { name: "w" batch_size: 1 } ]', "model_warmup"),
        ("instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]", "instance_group[1].gpus"),
    ],
)
def test_an_unsupported_field_is_refused_by_its_path(
    tmp_path: Path, extra: str, field: str
) -> None:
    message = refusal(tmp_path, GOOD + extra)
    assert f"field {field} is not supported" in message and "config.pbtxt" in message


def test_nested_unsupported_fields_are_named_with_their_path() -> None:
    config = parse_config(
        GOOD.replace("dims: [ -1 ] }", "dims: [ -1 ] optional: true }").replace(
            "dims: [ 1, 4 ] }", 'dims: [ 1, 4 ] initial_state: { data_file: "z" } }'
        ),
        "x",
    )
    assert sorted(unsupported_fields(config)) == [
        "input[0].optional",
        "sequence_batching.state[0].initial_state[0].data_file",
    ]


def test_triton_state_buffer_hints_from_its_implicit_state_docs_are_accepted(
    tmp_path: Path,
) -> None:
    """use_same_buffer_for_input_output and use_growable_memory tune Triton's own buffers: the
    config loads unchanged (the server keeps states in its own slab)."""
    hints = "dims: [ 1, 4 ] use_same_buffer_for_input_output: true use_growable_memory: true }"
    triton = load_triton_config(write_config(tmp_path, GOOD.replace("dims: [ 1, 4 ] }", hints)))
    assert [(s.input_name, s.dims) for s in triton.states] == [("h_in", (1, 4))]


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ('name: "m"', 'name: "other"', "name 'other' is not the folder's name 'm'"),
        ('backend: "onnxruntime"', 'backend: "pytorch"', "backend 'pytorch' is not onnxruntime"),
        ('key: "vocab_size"', 'key: "colour"', "parameters key 'colour' is not one of"),
        ("TYPE_FP32 dims: [ 1, 4 ]", "TYPE_INT32 dims: [ 1, 4 ]", "TYPE_FP32 or TYPE_FP16"),
        ("TYPE_INT64", "TYPE_STRING", "data_type TYPE_STRING is not one of"),
        ("dims: [ 1, 4 ] }", "dims: [ 1, 4 ] initial_state: { data_type: TYPE_FP32 dims: "
         '[ 1, 4 ] data_file: "h0.bin" name: "f" } }',
         "state[0].initial_state[0].data_file is not supported"),
        ("dims: [ 1, 4 ] }", "dims: [ 1, 4 ] initial_state: { data_type: TYPE_FP32 dims: "
         '[ 1, 4 ] zero_data: false name: "f" } }', "initial_state must be zero_data: true"),
    ],
)  # fmt: skip
def test_a_wrong_value_is_refused_naming_it(tmp_path: Path, old: str, new: str, says: str) -> None:
    assert old in GOOD
    assert says in refusal(tmp_path, GOOD.replace(old, new, 1))


def test_a_model_without_a_state_pair_is_refused(tmp_path: Path) -> None:
    text = GOOD.split("sequence_batching")[0] + "instance_group [ { kind: KIND_CPU } ]\n"
    assert "sequence_batching.state is missing" in refusal(tmp_path, text)


def test_a_correlation_id_control_needs_an_integer_type(tmp_path: Path) -> None:
    control = (
        '  control_input [ { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID '
        "data_type: TYPE_FP32 } ] } ]\n"
    )
    text = GOOD.replace("  direct", control + "  direct")
    assert "CORRID data_type must be an integer type" in refusal(tmp_path, text)
    triton = load_triton_config(
        write_config(tmp_path, text.replace("TYPE_FP32 }", "TYPE_UINT64 }"))
    )
    assert [(c.name, c.kind, c.dtype) for c in triton.controls] == [
        ("CORRID", "CORRID", np.dtype(np.uint64))
    ]


def test_a_file_that_is_not_a_model_config_names_the_file(tmp_path: Path) -> None:
    message = refusal(tmp_path, "name: 'm'\nmax_batch_sise: 3\n")
    assert "config.pbtxt: not a Triton ModelConfig" in message and "max_batch_sise" in message


def test_labels_are_read_one_per_line_and_counted(tmp_path: Path) -> None:
    text = GOOD.replace("dims: [ -1, 3 ] }", 'dims: [ -1, 3 ] label_filename: "l.txt" }')
    folder = write_config(tmp_path, text)
    triton = load_triton_config(folder)
    output = triton.outputs[0]
    (folder / "l.txt").write_text("a\nb\nc\n\n")
    assert triton.labels(output, 3) == ("a", "b", "c")
    assert triton.labels(triton.outputs[0].__class__("x", output.dtype, ()), 2) == (
        "class_0",
        "class_1",
    )
    (folder / "l.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match=r"l.txt: label_filename of output 'logits' has 2 lines"):
        triton.labels(output, 3)
    (folder / "l.txt").unlink()
    with pytest.raises(ConfigError, match=r"label_filename 'l\.txt': cannot read"):
        triton.labels(output, 3)


# -- the state layout and the batcher's grouping ------------------------------------------------


def test_the_state_layout_moves_each_batch_axis_and_round_trips_exactly() -> None:
    h = BoundState(StateSpec("h0", "hn", np.dtype(np.float32), ()), (2, 4), 1)  # (L, B, H)
    c = BoundState(StateSpec("c0", "cn", np.dtype(np.float16), ()), (2, 4), 1)
    layout = StateLayout((h, c))
    assert (layout.rows, layout.hidden) == (4, 4)
    assert layout.row_names == ("h0[0]", "h0[1]", "c0[0]", "c0[1]")
    flat = np.arange(3 * 16, dtype=np.float32).reshape(3, 4, 4) / 7  # (B, S, H)
    flat[:, 2:] = flat[:, 2:].astype(np.float16)  # what a float16 state can hold
    feeds = layout.unpack(flat)
    assert feeds["h0"].shape == (2, 3, 4) and feeds["c0"].dtype == np.float16
    np.testing.assert_array_equal(feeds["h0"][1, 2], flat[2, 1])  # layer 1 of row 2
    back = layout.pack({"hn": feeds["h0"], "cn": feeds["c0"]})
    np.testing.assert_array_equal(back, flat)


def test_states_of_different_widths_share_one_flat_row() -> None:
    a = BoundState(StateSpec("a", "a2", np.dtype(np.float32), ()), (3,), 0)
    b = BoundState(StateSpec("b", "b2", np.dtype(np.float32), ()), (2, 5), 0)
    layout = StateLayout((a, b))
    assert (layout.rows, layout.hidden, layout.row_names) == (1, 13, ("state",))
    flat = np.random.default_rng(0).normal(size=(2, 1, 13)).astype(np.float32)
    feeds = layout.unpack(flat)
    np.testing.assert_array_equal(layout.pack({"a2": feeds["a"], "b2": feeds["b"]}), flat)


class _Session:
    closed = None


def test_without_lengths_the_batcher_groups_chunks_of_one_length() -> None:
    async def batches(equal: bool) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        queue = PendingChunks(BatchPolicy(), InflightCounter(), equal_lengths=equal)
        for steps in (3, 3, 2, 4, 3, 2):
            item = Pending(_Session(), 1, np.zeros(steps, np.int64), loop.create_future())  # type: ignore[arg-type]
            queue.add(item)
        taken = []
        while len(queue):
            taken.append(sorted(item.steps for item in queue.take()))
        return taken

    assert asyncio.run(batches(True)) == [[3, 3, 3], [2, 2], [4]]
    assert asyncio.run(batches(False))[0] == [2, 2, 3, 3, 3, 4]  # 3-4 bucket, then shorter


# -- the generic runtime on real exports --------------------------------------------------------


def export(model: nn.Module, folder: Path, args: tuple[torch.Tensor, ...], inputs: list[str],
           outputs: list[str], dynamic: dict[str, dict[int, str]]) -> Path:  # fmt: skip
    path = folder / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    torch.onnx.export(model.eval(), args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic, dynamo=False)  # fmt: skip
    return path


class FramesGru(nn.Module):
    """features (B, T, 5) and a float16 state (B, 1, 6) -> final probabilities (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, frames: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, h = self.gru(frames, state.float().transpose(0, 1))
        return torch.softmax(self.head(y[:, -1]), -1), h.transpose(0, 1).half()


FRAMES_CONFIG = """
max_batch_size: 4
input [ { name: "frames" data_type: TYPE_FP32 dims: [ -1, 5 ] } ]
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 3 ] } ]
sequence_batching { state [ { input_name: "h" output_name: "h_next" data_type: TYPE_FP16
                              dims: [ 1, 6 ] } ] }
parameters { key: "output_kind" value: { string_value: "probs" } }
"""


def test_a_final_only_float16_state_model_is_stepped_so_every_step_has_probs(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = FramesGru()
    folder = tmp_path / "frames"
    args = (torch.zeros(1, 2, 5), torch.zeros(1, 1, 6, dtype=torch.float16))
    path = export(model, folder, args, ["frames", "h"], ["probs", "h_next"],
                  {"frames": {0: "b", 1: "t"}, "h": {0: "b"}, "probs": {0: "b"},
                   "h_next": {0: "b"}})  # fmt: skip
    (folder / "config.pbtxt").write_text(FRAMES_CONFIG)
    runtime = load_worker(path).runtime
    assert isinstance(runtime, GenericRuntime)
    desc = runtime.description
    assert (desc.input_kind, desc.feature_dim, desc.state_rows, desc.hidden_size) == (
        "features", 5, 1, 6
    )  # fmt: skip
    x = np.random.default_rng(1).normal(size=(3, 6, 5)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    out = runtime.run(x, lengths, np.zeros((3, 1, 6), np.float32))
    for b, n in enumerate(lengths):
        for t in range(1, n + 1):
            with torch.no_grad():
                want = model(torch.from_numpy(x[b : b + 1, :t]), args[1])[0][0].numpy()
            np.testing.assert_allclose(out.step_probs[b, t - 1], want, atol=2e-3)
        np.testing.assert_array_equal(out.probs[b], out.step_probs[b, n - 1])


class FixedWindow(nn.Module):
    """tokens (B, 2) exactly, a START control (B, 1), state (B, 1, 4) -> logits (B, 2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.rnn = nn.RNN(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor, start: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        y, h = self.rnn(self.embedding(tokens), state.transpose(0, 1))
        # START shows in the first window, on class 0
        logits = self.head(y) + 4.0 * start[:, :, None] * torch.tensor([1.0, 0.0, 0.0])
        return logits, h.transpose(0, 1)


FIXED_CONFIG = """
max_batch_size: 8
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ 2 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
sequence_batching {
  control_input [ { name: "start" control [ { kind: CONTROL_SEQUENCE_START
                                              fp32_false_true: [ 0, 1 ] } ] } ]
  state [ { input_name: "s" output_name: "s_next" data_type: TYPE_FP32 dims: [ 1, 4 ] } ]
}
"""


@pytest.fixture(scope="module")
def fixed_window(tmp_path_factory: pytest.TempPathFactory) -> tuple[FixedWindow, Path]:
    torch.manual_seed(2)
    model = FixedWindow()
    folder = tmp_path_factory.mktemp("fixed") / "fixed"
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1), torch.zeros(1, 1, 4))
    path = export(model, folder, args, ["tokens", "start", "s"], ["logits", "s_next"],
                  {"tokens": {0: "b"}, "start": {0: "b"}, "s": {0: "b"}, "logits": {0: "b"},
                   "s_next": {0: "b"}})  # fmt: skip
    (folder / "config.pbtxt").write_text(FIXED_CONFIG)
    return model, path


def _torch_windows(model: FixedWindow, tokens: np.ndarray) -> np.ndarray:
    state, probs = torch.zeros(1, 1, 4), []
    for w in range(0, tokens.shape[0], 2):
        start = torch.tensor([[1.0 if w == 0 else 0.0]])
        with torch.no_grad():
            logits, state = model(torch.from_numpy(tokens[None, w : w + 2]), start, state)
        probs.append(torch.softmax(logits, -1)[0].numpy())
    return np.concatenate(probs)


def test_a_fixed_time_dimension_is_stepped_through_with_start_fed(
    fixed_window: tuple[FixedWindow, Path],
) -> None:
    model, path = fixed_window
    runtime = load_worker(path).runtime
    assert isinstance(runtime, GenericRuntime) and runtime.binding.window == 2
    tokens = np.array([[1, 5, 7, 2, 9, 0], [3, 3, 8, 1, 0, 0]], dtype=np.int64)
    lengths = np.array([6, 4])
    out = runtime.run(tokens, lengths, np.zeros((2, 1, 4), np.float32))
    assert runtime.description.output_kind == "logits"  # the runtime returns them as computed
    step_probs = probabilities(out.step_probs, "logits")
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(step_probs[b, :n], _torch_windows(model, tokens[b, :n]),
                                   atol=1e-6)  # fmt: skip
    # Streamed in two chunks: START only in the first (the second's state is not zero).
    first = runtime.run(tokens[:1, :2], np.array([2]), np.zeros((1, 1, 4), np.float32))
    second = runtime.run(tokens[:1, 2:6], np.array([4]), first.state_out)
    np.testing.assert_allclose(second.step_probs[0], out.step_probs[0, 2:6], atol=1e-6)


def test_a_chunk_that_is_not_a_multiple_of_the_fixed_window_is_invalid(
    fixed_window: tuple[FixedWindow, Path],
) -> None:
    runtime = load_worker(fixed_window[1]).runtime
    with pytest.raises(InvalidInput, match="fixed time dimension of 2 steps: a chunk of 3"):
        runtime.run(np.zeros((1, 3), np.int64), np.array([3]), np.zeros((1, 1, 4), np.float32))


V1_CONFIG = """
max_batch_size: 0
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, -1 ] },
        { name: "lengths" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "step_probs" data_type: TYPE_FP32 dims: [ -1, -1, 3 ] },
         { name: "probs" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
sequence_batching { state [ { input_name: "state" output_name: "state_out"
                              data_type: TYPE_FP32 dims: [ -1, 4, 8 ] } ] }
parameters { key: "output_kind" value: { string_value: "probs" } }
"""


def test_a_lengths_input_batches_mixed_lengths_in_one_run_exactly(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """Our own tiny LSTM served through a config.pbtxt equals the native runtime."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", folder / "1")
    (folder / "config.pbtxt").write_text(V1_CONFIG)
    generic = load_worker(folder / "1" / "model.onnx").runtime
    native = ModelRuntime(folder / "1" / "model.onnx", CPU)
    assert isinstance(generic, GenericRuntime) and not generic.equal_lengths
    rng = np.random.default_rng(4)
    x = rng.integers(0, 28, size=(4, 9))
    lengths = np.array([9, 1, 5, 7])
    state = rng.normal(size=(4, 4, 8)).astype(np.float32)
    got, want = generic.run(x, lengths, state), native.run(x, lengths, state)
    np.testing.assert_array_equal(got.probs, want.probs)
    np.testing.assert_array_equal(got.state_out, want.state_out)
    # An lstm-export file keeps its own labels and tokenizer where the config names none.
    assert generic.description.vocab_size == native.description.vocab_size == 28
    assert generic.description.labels == native.description.labels
    assert generic.description.tokenizer == native.description.tokenizer is not None


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t: t.replace("dims: [ -1, 4, 8 ]", "dims: [ -1, 4, 9 ]"),
         "sequence_batching.state 'state' is [?, 4, 9] in config.pbtxt but [?, 4, 8]"),
        (lambda t: t.replace('name: "probs" data_type: TYPE_FP32',
                             'name: "probz" data_type: TYPE_FP32'),
         "output 'probz' is not a graph output"),
        (lambda t: t.replace('{ name: "lengths" data_type: TYPE_INT64 dims: [ -1 ] } ]', "]")
         .replace("dims: [ -1, -1 ] },", "dims: [ -1, -1 ] }"),
         "the ONNX input 'lengths' is neither an input"),
        (lambda t: t.replace("TYPE_INT64 dims: [ -1, -1 ]", "TYPE_INT32 dims: [ -1, -1 ]"),
         "input 'tokens' is int32 in config.pbtxt but tensor(int64)"),
        (lambda t: t.replace("dims: [ -1, 3 ] }", "dims: [ -1, 4 ] }"),
         "output 'probs' is [?, 4] in config.pbtxt but [?, 3]"),
    ],
)  # fmt: skip
def test_a_config_that_disagrees_with_the_graph_is_refused_at_load(
    tiny_repo: Path, tmp_path: Path, edit: Callable[[str], str], says: str
) -> None:
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", folder / "1")
    (folder / "config.pbtxt").write_text(edit(V1_CONFIG))
    with pytest.raises(ConfigError) as refused:
        load_worker(folder / "1" / "model.onnx")
    assert says in str(refused.value) and "config.pbtxt" in str(refused.value)


def test_kind_gpu_is_refused_where_there_is_no_cuda(tiny_repo: Path, tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", folder / "1")
    (folder / "config.pbtxt").write_text(V1_CONFIG + "instance_group [ { kind: KIND_GPU } ]\n")
    with pytest.raises(ConfigError, match="KIND_GPU: the CUDA execution provider is not"):
        load_worker(folder / "1" / "model.onnx")


def test_the_parsed_config_is_kept_as_tritonclients_message(tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2

    triton: TritonModel = load_triton_config(write_config(tmp_path, GOOD))
    assert isinstance(triton.config, model_config_pb2.ModelConfig)
    assert triton.config.sequence_batching.state[0].input_name == "h_in"


def test_a_vocab_file_gives_the_model_a_character_tokenizer(
    tiny_repo: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", folder / "1")
    params = (
        'parameters { key: "vocab_filename" value: { string_value: "vocab.txt" } }\n'
        'parameters { key: "lowercase" value: { string_value: "true" } }\n'
    )
    (folder / "config.pbtxt").write_text(V1_CONFIG + params)
    (folder / "vocab.txt").write_text("<unk>\n" + "\n".join("abcdefghijklmnopqrstuvwxyz ") + "\n")
    tokenizer = load_worker(folder / "1" / "model.onnx").description.tokenizer
    assert tokenizer is not None and tokenizer.encode("Ab z?") == [1, 2, 27, 26, 0]
    (folder / "vocab.txt").write_text("<unk>\nab\nc\n")
    with pytest.raises(ConfigError, match="vocab_filename needs one character per line"):
        load_worker(folder / "1" / "model.onnx")


class Correlated(nn.Module):
    """tokens (B, T), a CORRID (B, 1) int64, state (B, 1, 4) -> logits that show CORRID % 7."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor, corrid: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        y, h = self.rnn(self.embedding(tokens), state.transpose(0, 1))
        shift = torch.remainder(corrid, 7).float()[:, :, None] * torch.tensor([1.0, 0.0, 0.0])
        return self.head(y) + shift, h.transpose(0, 1)


CORRID_CONFIG = """
max_batch_size: 8
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
sequence_batching {
  control_input [ { name: "corrid" control [ { kind: CONTROL_SEQUENCE_CORRID
                                               data_type: TYPE_INT64 } ] } ]
  state [ { input_name: "s" output_name: "s_next" data_type: TYPE_FP32 dims: [ 1, 4 ] } ]
}
"""


def test_a_corrid_control_gets_a_number_from_each_rows_session_id(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Correlated()
    folder = tmp_path / "corr"
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, 1, 4))  # fmt: skip
    path = export(model, folder, args, ["tokens", "corrid", "s"], ["logits", "s_next"],
                  {"tokens": {0: "b", 1: "t"}, "corrid": {0: "b"}, "s": {0: "b"},
                   "logits": {0: "b", 1: "t"}, "s_next": {0: "b"}})  # fmt: skip
    (folder / "config.pbtxt").write_text(CORRID_CONFIG)
    runtime = load_worker(path).runtime
    ids = ["00000000000000ff" + "0" * 16, "0000000000000010" + "0" * 16]  # CORRID 127 and 8
    tokens = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    out = runtime.run(tokens, np.array([3, 3]), np.zeros((2, 1, 4), np.float32), ids=ids)
    for b, corrid in enumerate((127, 8)):
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens[b : b + 1]), torch.tensor([[corrid]]),
                           torch.zeros(1, 1, 4))[0]  # fmt: skip
        np.testing.assert_allclose(out.step_probs[b], logits[0], atol=1e-5)  # as computed


def test_an_export_with_a_fixed_batch_dimension_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    args = (torch.zeros(1, 2, 5), torch.zeros(1, 1, 6, dtype=torch.float16))
    path = export(FramesGru(), folder, args, ["frames", "h"], ["probs", "h_next"],
                  {"frames": {1: "t"}})  # fmt: skip
    (folder / "config.pbtxt").write_text(FRAMES_CONFIG)
    with pytest.raises(ConfigError, match="input 'frames' has a fixed batch dimension 1"):
        load_worker(path)


BATCHED_V1_CONFIG = """
max_batch_size: 8
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "lengths" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } } ]
output [ { name: "step_probs" data_type: TYPE_FP32 dims: [ -1, 3 ] },
         { name: "probs" data_type: TYPE_FP32 dims: [ 3 ] } ]
sequence_batching { state [ { input_name: "state" output_name: "state_out"
                              data_type: TYPE_FP32 dims: [ 4, 8 ] } ] }
parameters { key: "output_kind" value: { string_value: "probs" } }
"""


def test_triton_s_reshape_gives_a_batched_model_its_b_lengths_input(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """dims [1] + reshape { shape: [] }: how a Triton config with max_batch_size > 0 says [B]."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", folder / "1")
    (folder / "config.pbtxt").write_text(BATCHED_V1_CONFIG)
    generic = load_worker(folder / "1" / "model.onnx").runtime
    native = ModelRuntime(folder / "1" / "model.onnx", CPU)
    assert isinstance(generic, GenericRuntime) and generic.binding.lengths_tail == ()
    x = np.random.default_rng(5).integers(0, 28, size=(3, 6))
    lengths, state = np.array([6, 2, 4]), np.zeros((3, 4, 8), np.float32)
    np.testing.assert_array_equal(generic.run(x, lengths, state).probs,
                                  native.run(x, lengths, state).probs)  # fmt: skip
    # More rows than max_batch_size (8), as a Classify request may bring: run in blocks.
    x = np.random.default_rng(6).integers(0, 28, size=(19, 5))
    lengths, state = np.random.default_rng(7).integers(1, 6, size=19), np.zeros((19, 4, 8), "f4")
    got, want = generic.run(x, lengths, state), native.run(x, lengths, state)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    np.testing.assert_allclose(got.state_out, want.state_out, atol=1e-6)


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [1, 2, 3]),
        ("version_policy { all { } }", [1, 2, 3]),
        ("version_policy { latest { num_versions: 2 } }", [2, 3]),
        ("version_policy { specific { versions: [ 1, 3 ] } }", [1, 3]),
    ],
)
def test_the_version_policy_chooses_the_versions_served(
    tiny_repo: Path, tmp_path: Path, policy: str, served: list[int]
) -> None:
    from service.engine.model.repository import discover

    for version in (1, 2, 3):
        shutil.copytree(tiny_repo / "tiny-lstm" / "1", tmp_path / "tiny" / str(version))
    (tmp_path / "tiny" / "config.pbtxt").write_text(V1_CONFIG + policy + "\n")
    assert sorted(v for _, v in discover(tmp_path, configs=TritonConfigReader())) == served
    assert not list(unsupported_fields(parse_config(V1_CONFIG + policy, "x")))


def test_random_state_layouts_round_trip_exactly() -> None:
    rng = np.random.default_rng(12)
    for _ in range(40):
        states = []
        for k in range(int(rng.integers(1, 4))):
            shape = tuple(int(d) for d in rng.integers(1, 5, size=int(rng.integers(1, 4))))
            dtype = np.dtype(np.float16 if rng.random() < 0.3 else np.float32)
            axis = int(rng.integers(0, len(shape) + 1))
            states.append(BoundState(StateSpec(f"s{k}", f"o{k}", dtype, ()), shape, axis))
        layout = StateLayout(tuple(states))
        batch = int(rng.integers(1, 4))
        flat = rng.normal(size=(batch, layout.rows, layout.hidden)).astype(np.float16)
        flat = flat.astype(np.float32)  # values every state's dtype holds exactly
        feeds = layout.unpack(flat)
        for s in states:
            full = list(s.shape)
            full.insert(s.batch_axis, batch)
            assert feeds[s.spec.input_name].shape == tuple(full)
            assert feeds[s.spec.input_name].dtype == s.spec.dtype
        back = layout.pack({f"o{k}": feeds[f"s{k}"] for k in range(len(states))})
        np.testing.assert_array_equal(back, flat)

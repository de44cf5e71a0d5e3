"""`lstm-export from-torch`: a user's own PyTorch module, mapped onto our exporter.

The module is built from the user's file and state dict, and its parts are found by type under
the user's own attribute names (walking `named_modules` in registration order): an optional
`nn.Embedding`, one or more `nn.LSTM` / `nn.GRU` / `nn.RNN` (a stack), an `nn.Linear` head. The
weights are copied into a `RecurrentClassifier` and written by the native-op exporter (v1
contract). What the user's `forward` returns (the last step or every step; logits, probabilities
or log-probabilities; batch- or time-major) is found by running it against the mapped model, and
the written file is then verified against the user's module itself with onnxruntime, whole and
streamed in chunks through the state (export/user_parity.py); nothing is written unless it agrees.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.arch import ArchConfig
from export.model import RecurrentClassifier
from export.user_parity import (
    GENERIC_PATH,
    TOLERANCE,
    Forward,
    VerificationError,
    detect_forward,
    verify_against_user,
)
from lstmserve.contract import ModelDescription

_CELLS: dict[type[nn.Module], str] = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}
# Parameter-free modules that change nothing a classifier's mapping depends on (at eval).
_PASSIVE: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity, nn.Softmax, nn.LogSoftmax)


class MappingError(ValueError):
    """The user's module has a part the native-op exporter cannot map."""


@dataclass(frozen=True)
class Parts:
    """The user's mapped submodules, by their own attribute names."""

    recurrent: list[tuple[str, nn.RNNBase]]
    head: tuple[str, nn.Linear]
    embedding: tuple[str, nn.Embedding] | None = None

    @property
    def binary(self) -> bool:
        """A one-output head: a binary classifier read through a sigmoid."""
        return self.head[1].out_features == 1

    def names(self) -> dict[str, str]:
        """Our part -> the user's attribute (and type), for the card."""
        out = {"embedding": _label(*self.embedding)} if self.embedding else {}
        out["recurrent"] = ", ".join(_label(n, m) for n, m in self.recurrent)
        out["head"] = _label(*self.head)
        return out


def _label(name: str, module: nn.Module) -> str:
    return f"{name} ({type(module).__name__})"


def _refuse(name: str, module: nn.Module, why: str) -> MappingError:
    return MappingError(f"cannot map {name!r} ({type(module).__name__}): {why}; {GENERIC_PATH}")


# -- loading ---------------------------------------------------------------------------------


def load_module_class(spec: str) -> type[nn.Module]:
    """'path/to/file.py:ClassName' -> the class, imported from that file."""
    path_text, sep, class_name = spec.rpartition(":")
    path = Path(path_text)
    if not sep or not class_name or path.suffix != ".py":
        raise ValueError(f"--module must be FILE.py:CLASS, got {spec[:64]!r}")
    if not path.is_file():
        raise ValueError(f"--module file {path_text[:64]!r} does not exist")
    module_name = f"_lstm_export_user_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.resolve().parent))  # its own imports of files beside it
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: say where it failed, not our traceback
        raise ValueError(f"importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path.name} has no nn.Module class named {class_name[:64]!r}")
    return cls


def build_user_module(spec: str, weights: Path, kwargs: dict[str, Any]) -> nn.Module:
    """The user's module built with `kwargs`, its state dict loaded (strict), in eval mode."""
    cls = load_module_class(spec)
    try:
        module = cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}(**{json.dumps(kwargs)[:64]}) failed: {exc}") from exc
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled whole module, a file that is not torch.save's
        raise ValueError(
            f"--weights {weights.name!r} is not a state dict saved with "
            f"torch.save(model.state_dict(), ...): {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(
            f"--weights {weights.name!r} holds a {type(state).__name__}, not a state dict"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--weights do not fit {cls.__name__}: {exc}") from exc
    return module.eval()


# -- finding the parts -----------------------------------------------------------------------


def _has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.named_parameters(recurse=False)) or any(
        True for _ in module.named_buffers(recurse=False)
    )


def _walk(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The mappable submodules in registration order; refuses anything else that computes."""
    if _has_own_tensors(root):
        names = [n for n, _ in root.named_parameters(recurse=False)]
        names += [n for n, _ in root.named_buffers(recurse=False)]
        raise _refuse(type(root).__name__, root, f"own parameters/buffers {names[:4]}")
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not name or isinstance(module, _PASSIVE):
            continue
        if isinstance(module, (nn.Embedding, nn.Linear, *_CELLS)):
            found.append((name, module))
        elif _has_own_tensors(module) or not any(True for _ in module.children()):
            raise _refuse(name, module, "not an Embedding, LSTM/GRU/RNN or Linear")
    return found


def find_parts(root: nn.Module) -> Parts:
    """Embedding? -> recurrent module(s) -> one Linear head, or a MappingError naming the part."""
    found = _walk(root)
    rec = [(n, m) for n, m in found if isinstance(m, nn.RNNBase)]
    lin = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
    emb = [(n, m) for n, m in found if isinstance(m, nn.Embedding)]
    if not rec:
        raise MappingError(f"no nn.LSTM, nn.GRU or nn.RNN in {type(root).__name__}; {GENERIC_PATH}")
    order = [n for n, _ in found]
    first, last = order.index(rec[0][0]), order.index(rec[-1][0])
    if len(lin) > 1:  # registration order tells which one sits between recurrent layers
        for name, module in lin:
            if first < order.index(name) < last:
                raise _refuse(name, module, "a Linear between recurrent layers")
    if len(lin) != 1:
        what = ", ".join(_label(n, m) for n, m in lin) or "none"
        raise MappingError(
            f"the head must be exactly one nn.Linear after the recurrent layers, found {what}; "
            f"{GENERIC_PATH}"
        )
    if len(emb) > 1:
        raise _refuse(*emb[1], "a second Embedding")
    if emb and emb[0][1].max_norm is not None:
        raise _refuse(*emb[0], f"max_norm={emb[0][1].max_norm} (it rewrites rows at lookup)")
    parts = Parts(recurrent=rec, head=lin[0], embedding=emb[0] if emb else None)
    _check_recurrent(parts)
    return parts


def _check_recurrent(parts: Parts) -> None:
    """One cell kind, hidden size and direction count; input sizes that chain; no projection."""
    name0, rnn0 = parts.recurrent[0]
    size = parts.embedding[1].embedding_dim if parts.embedding else rnn0.input_size
    for name, rnn in parts.recurrent:
        if type(rnn) is not type(rnn0):
            raise _refuse(name, rnn, f"a different cell than {name0!r} ({type(rnn0).__name__})")
        if getattr(rnn, "proj_size", 0):
            raise _refuse(name, rnn, f"proj_size={rnn.proj_size} (LSTM projections)")
        if isinstance(rnn, nn.RNN) and rnn.nonlinearity != "tanh":
            raise _refuse(name, rnn, f"nonlinearity={rnn.nonlinearity!r} (only tanh)")
        if rnn.hidden_size != rnn0.hidden_size or rnn.bidirectional != rnn0.bidirectional:
            raise _refuse(name, rnn, f"hidden_size/bidirectional differ from {name0!r}")
        if rnn.input_size != size:
            raise _refuse(name, rnn, f"input_size={rnn.input_size}, its input is {size} wide")
        size = rnn.hidden_size * (2 if rnn.bidirectional else 1)
    head_name, head = parts.head
    if head.in_features != size:
        raise _refuse(
            head_name, head, f"in_features={head.in_features}, the last layer gives {size}"
        )


# -- mapping ---------------------------------------------------------------------------------


def arch_of(parts: Parts, num_classes: int, input_kind: str | None = None) -> ArchConfig:
    """The ArchConfig of the mapped model; `input_kind` (if given) must fit the parts."""
    kind = "tokens" if parts.embedding else "features"
    if input_kind not in (None, kind):
        found = "an Embedding" if parts.embedding else "no Embedding"
        raise ValueError(f"--input {input_kind}, but the module has {found} (so: {kind})")
    head_name, head = parts.head
    if head.out_features != num_classes and not (parts.binary and num_classes == 2):
        one = " (a one-output head takes 2 labels, the negative first)" if parts.binary else ""
        raise ValueError(
            f"--labels has {num_classes} labels, the head {head_name!r} gives "
            f"{head.out_features}{one}"
        )
    rnn0 = parts.recurrent[0][1]
    emb = parts.embedding[1] if parts.embedding else None
    return ArchConfig(
        cell=_CELLS[type(rnn0)],  # type: ignore[arg-type]
        hidden_size=rnn0.hidden_size,
        num_classes=num_classes,
        input_kind=kind,  # type: ignore[arg-type]
        num_layers=sum(rnn.num_layers for _, rnn in parts.recurrent),
        bidirectional=rnn0.bidirectional,
        vocab_size=emb.num_embeddings if emb else 0,
        embedding_dim=emb.embedding_dim if emb else 0,
        feature_dim=0 if emb else rnn0.input_size,
    )


def mapped_model(parts: Parts, arch: ArchConfig) -> RecurrentClassifier:
    """A RecurrentClassifier holding the user's weights (layer l of the k-th module -> one of
    our single-layer `layers`; bias=False -> zero biases)."""
    model = RecurrentClassifier(arch).eval()
    ours = iter(model.layers)
    with torch.no_grad():
        if parts.embedding:
            model.embedding.weight.copy_(parts.embedding[1].weight)
        for _, rnn in parts.recurrent:
            for layer in range(rnn.num_layers):
                target = next(ours).rnn
                for sfx in ("", "_reverse")[: arch.directions]:
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        dst = getattr(target, f"{kind}_l0{sfx}")
                        src = getattr(rnn, f"{kind}_l{layer}{sfx}", None)
                        dst.copy_(src) if src is not None else dst.zero_()
        weight, bias = parts.head[1].weight, parts.head[1].bias
        if bias is None:
            bias = torch.zeros(weight.shape[0])
        if parts.binary:  # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]
            weight = torch.cat([torch.zeros_like(weight), weight])
            bias = torch.cat([torch.zeros_like(bias), bias])
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    return model


# -- the command -----------------------------------------------------------------------------


def read_labels(path: Path) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise ValueError(f"--labels {path.name!r} has {len(labels)} labels (one per line, >= 2)")
    return labels


@dataclass(frozen=True)
class TokenizerChoice:
    """--tokenizer: a character tokenizer embedded in the description, or a subword
    tokenizer.json (Hugging Face `tokenizers`) copied beside model.onnx, where the server
    reads it."""

    def describe(self) -> str:
        if self.chars:
            return f"characters, {len(self.chars['vocab'])} entries (in the description)"
        if self.subword_file:
            return "subwords: tokenizer.json beside model.onnx"
        return "none: clients send token ids (or frames)"

    chars: dict[str, Any] | None = None
    subword_file: Path | None = None


def _subword_ids(data: dict[str, Any]) -> int:
    """How many ids a tokenizer.json can produce (its largest id + 1), read from the JSON."""
    vocab = data["model"].get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [int(t["id"]) for t in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else 0


def read_tokenizer(spec: str | None, vocab_size: int) -> TokenizerChoice:
    """'chars:VOCAB.txt' (one entry per line, line i = id i, line 0 the unknown token), our own
    character tokenizer as JSON ({"type": "chars", "vocab": [...]}), or a subword tokenizer.json;
    every id it gives must be a row of the Embedding."""
    if spec is None:
        return TokenizerChoice()
    from lstmserve.contract import Tokenizer

    if spec.startswith("chars:"):
        text = Path(spec[len("chars:") :]).read_text(encoding="utf-8")
        data: dict[str, Any] = {"type": "chars", "vocab": text.rstrip("\n").split("\n")}
    else:
        try:
            data = json.loads(Path(spec).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--tokenizer {Path(spec).name!r} is not JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # a tokenizers file
        ids = _subword_ids(data)
        if ids > vocab_size:
            raise ValueError(f"--tokenizer gives ids up to {ids - 1}, the Embedding has "
                             f"{vocab_size} rows")  # fmt: skip
        return TokenizerChoice(subword_file=Path(spec))
    tokenizer = Tokenizer.from_dict(data).to_dict()
    if len(tokenizer["vocab"]) > vocab_size:
        raise ValueError(
            f"--tokenizer has {len(tokenizer['vocab'])} entries, the Embedding only {vocab_size}"
        )
    return TokenizerChoice(chars=tokenizer)


def parse_out(out: Path) -> tuple[str, int]:
    """REPO/NAME/VERSION -> (NAME, VERSION)."""
    if not out.name.isdigit() or int(out.name) < 1:
        raise ValueError(f"--out must end in NAME/VERSION (VERSION >= 1), got {str(out)[:64]!r}")
    return out.parent.name, int(out.name)


def model_card(name: str, version: int, report: dict[str, Any]) -> str:
    """The README.md written beside model.onnx."""
    mapping = "\n".join(f"| {ours} | `{theirs}` |" for ours, theirs in report["mapping"].items())
    user = report["verify_user_module"]
    streamed = user["max_diff_user_module_vs_streamed_chunks"]
    streamed = "not streamable (bidirectional)" if streamed is None else f"{streamed:.2e}"
    arch = report["architecture"]
    dirs = "bidirectional (Classify only, not streamable)" if arch["bidirectional"] else "causal"
    return f"""# {name}/{version}: `{report["module"]}` from PyTorch

Mapped by `lstm-export from-torch` from the user's own module; the description the service
reads is embedded in `model.onnx` (metadata key `lstm_serve.description`).

## Model
- {arch["num_layers"]} x {arch["cell"].upper()}, hidden {arch["hidden_size"]}, {dirs};
  input: {arch["input_kind"]}; labels: {", ".join(report["labels"])}.
- Tokenizer: {report["tokenizer"]}.
- The module's forward: {user["forward"]}.

| our part | the module's attribute |
|---|---|
{mapping}

## Verification against the module itself (onnxruntime on this file), tolerance {TOLERANCE}
- Max |module - served| on probabilities, one call (batch 3, lengths 1, 2, 5, 16):
  {user["max_diff_user_module_vs_onnxruntime"]:.2e}.
- Streamed in chunks through the state, each answer vs the module on the sequence so far:
  {streamed}.
- The v1 contract checks (`lstm-export verify`): passed = {report["verify_contract"]["passed"]}.

## Reproduce
```
{report["command"]}
```
"""


def export_from_torch(
    module: str, weights: Path, labels_path: Path, out: Path, kwargs: dict[str, Any],
    tokenizer: str | None = None, input_kind: str | None = None, command: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Build, map, write and verify; model.onnx and README.md land in `out` only if the model
    equals the user's module. Raises MappingError / VerificationError / ValueError."""
    from export.onnx_export import describe

    name, version = parse_out(out)
    labels = read_labels(labels_path)
    user = build_user_module(module, weights, kwargs)
    parts = find_parts(user)
    arch = arch_of(parts, len(labels), input_kind)
    model = mapped_model(parts, arch)
    fwd = detect_forward(user, model, binary=parts.binary)
    if tokenizer and arch.input_kind != "tokens":
        raise ValueError("--tokenizer is for a token model (with an nn.Embedding)")
    tok = read_tokenizer(tokenizer, arch.vocab_size)
    training = {"source": "lstm-export from-torch", "module": module, "command": command,
                "forward": fwd.describe()}  # fmt: skip
    desc = describe(model, name, version, labels, tokenizer=tok.chars, training=training)
    report = {"model": f"{name}/{version}", "module": module, "labels": labels,
              "architecture": arch.to_dict(), "mapping": parts.names(),
              "tokenizer": tok.describe(), "command": command}  # fmt: skip
    report |= _write_verified(model, desc, user, fwd, out, tok)
    (out / "README.md").write_text(model_card(name, version, report), encoding="utf-8")
    return report


def _write_verified(
    model: RecurrentClassifier, desc: ModelDescription, user: nn.Module, fwd: Forward,
    out: Path, tok: TokenizerChoice,
) -> dict[str, Any]:  # fmt: skip
    """Export to a temporary file, verify it against the user's module and the v1 contract,
    then move it (and a subword tokenizer) into `out`; the two verification reports."""
    import shutil
    import tempfile

    from export.onnx_export import export_model
    from export.verify import verify_model

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        export_model(model, desc, str(staged))
        parity = verify_against_user(user, fwd, model.arch, staged)
        if not parity.passed:
            raise VerificationError(
                f"the exported model differs from {type(user).__name__}: "
                + "; ".join(parity.failures[:6])
            )
        contract = verify_model(staged).to_dict()
        if not contract["passed"]:
            raise VerificationError(f"the v1 contract checks failed: {json.dumps(contract)}")
        out.mkdir(parents=True, exist_ok=True)
        if tok.subword_file is not None:  # before the model, which a polling server may load
            shutil.copyfile(tok.subword_file, out / "tokenizer.json")
        shutil.move(staged, out / "model.onnx")
    return {"verify_user_module": parity.to_dict(), "verify_contract": contract}

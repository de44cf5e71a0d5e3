"""lstm-client: list models, classify text, token ids or frames, stream live, resume a session."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import grpc
import numpy as np

from lstmserve.client import LstmClient, SessionLost, StreamSession, decision_rule
from lstmserve.v1 import lstm_serve_pb2 as pb


def load_frames(path: Path) -> np.ndarray:
    """A (T, F) float32 array from a .npy file or a CSV file (one frame per line)."""
    try:
        raw = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
    except OSError as exc:
        raise ValueError(f"--frames {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # not a .npy file, or not numbers
        raise ValueError(f"--frames {path}: {exc}") from exc
    frames = np.asarray(raw, dtype=np.float32)
    if frames.ndim != 2:
        raise ValueError(f"--frames {path}: frames must be 2-D (T, F), got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"--frames {path}: the file holds no frames")
    return frames


def parse_tokens(text: str, where: str) -> np.ndarray:
    """Token ids separated by spaces, commas or newlines -> (T,) int64, each checked."""
    words = text.replace(",", " ").split()
    if not words:
        raise ValueError(f"{where}: no token ids")
    ids = []
    for i, word in enumerate(words):
        if not (word.isascii() and word.isdigit()) or len(word) > 18:
            raise ValueError(
                f"{where}: token {i + 1} is {word[:32]!r}, not a token id (an integer >= 0)"
            )
        ids.append(int(word))
    return np.array(ids, dtype=np.int64)


def load_tokens(path: Path) -> np.ndarray:
    """--tokens-file: ids separated by spaces, commas or newlines."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--tokens-file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"--tokens-file {path}: not text ({exc.reason})") from exc
    return parse_tokens(text, f"--tokens-file {path}")


def format_top(top: Sequence[pb.LabelScore]) -> str:
    return "  ".join(f"{t.label} {t.probability:.3f}" for t in top)


class LiveLine:
    """One line rewritten in place on a terminal; one line per update otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.width = 0

    def update(self, text: str) -> None:
        if self.tty:
            self.out.write("\r" + text.ljust(self.width))
            self.width = max(self.width, len(text))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


async def cmd_list(client: LstmClient, args: argparse.Namespace) -> int:
    for m in await client.list_models():
        shape = f"S×H={m.state_rows}×{m.hidden_size}"
        width = f"vocab={m.vocab_size}" if m.input_kind == "tokens" else f"F={m.feature_dim}"
        fallback = f" cpu_fallback={len(m.cpu_fallback)}" if m.cpu_fallback else ""
        # a model whose outputs are not probabilities says so (the answers are converted)
        kind = f"  outputs={m.output_kind}" if m.output_kind not in ("", "probs") else ""
        print(
            f"{m.name} v{m.version}{' (latest)' if m.latest else ''}  {m.input_kind} {width}  "
            f"{shape}  streamable={str(m.streamable).lower()}  {m.provider}{fallback}  "
            f"labels={','.join(m.labels)}{kind}"
        )
    return 0


async def cmd_classify(client: LstmClient, args: argparse.Namespace) -> int:
    steps = read_steps(args)
    reply = await client.classify(args.model, [steps], version=args.version, top_k=args.top_k)
    result = reply.results[0]
    if args.json:
        top = [{"label": t.label, "probability": t.probability} for t in result.top]
        print(json.dumps({"model": reply.model, "version": reply.version, "top": top}))
    else:
        print(f"{reply.model} v{reply.version}  {result.length} steps  {format_top(result.top)}")
    return 0


def read_steps(args: argparse.Namespace) -> str | np.ndarray:
    """The --text, the --tokens, or the --frames / --tokens-file read and checked: before
    anything is sent. Token ids are (T,) int64, frames (T, F) float32."""
    if args.tokens is not None:
        return parse_tokens(args.tokens, "--tokens")
    if args.tokens_file is not None:
        return load_tokens(args.tokens_file)
    if args.text is None:
        return load_frames(args.frames)
    if not args.text:
        raise ValueError("--text is empty")
    return str(args.text)


def check_input(info: pb.ModelInfo, steps: str | np.ndarray, frames: Path | None) -> None:
    """A ValueError when `info`'s model cannot take these steps (checked before streaming)."""
    name = f"{info.name} v{info.version}"
    if isinstance(steps, str):
        if info.input_kind != "tokens":
            raise ValueError(
                f"{name} takes frames ({info.feature_dim} features each), not text: "
                "give --frames FILE instead of --text"
            )
        if not info.HasField("tokenizer"):
            raise ValueError(
                f"{name} has no tokenizer: it takes token ids, not --text: give --tokens "
                '"ID ID ..." or --tokens-file FILE'
            )
        return
    if steps.ndim == 1:  # token ids
        if info.input_kind != "tokens":
            raise ValueError(
                f"{name} takes frames ({info.feature_dim} features each), not token ids: "
                "give --frames FILE"
            )
        if info.vocab_size and int(steps.max()) >= info.vocab_size:
            bad = int(np.flatnonzero(steps >= info.vocab_size)[0])
            raise ValueError(
                f"token {bad + 1} is id {int(steps[bad])}: {name} takes ids 0 .. "
                f"{info.vocab_size - 1}"
            )
        return
    if info.input_kind != "features":
        raise ValueError(
            f"{name} takes text (input_kind {info.input_kind}), not frames: give --text "
            f"instead of --frames {frames}"
        )
    if steps.shape[1] != info.feature_dim:
        raise ValueError(
            f"--frames {frames}: {steps.shape[1]} features per frame, {name} takes "
            f"{info.feature_dim}"
        )


RESUMED = "…"  # stands for the text a resumed session was fed before this run


def shown_text(steps: str, fed: int, resumed: bool) -> str:
    """The text fed so far: the first `fed` characters of this run's, after what a resumed
    session held back from before (the server feeds that first; this run does not know it)."""
    return (RESUMED if resumed else "") + steps[: max(0, fed)]


async def stream_steps(
    session: StreamSession, steps: str | np.ndarray, delay_s: float, line: LiveLine,
    resumed: bool = False,
) -> int:  # fmt: skip
    """Send one character (token id, or frame) per chunk, showing the top label as it changes
    (every reply answers all the text sent so far, after "…" for a resumed session's text from
    before); returns how many chunks the server refused. A session with a decision rule shows
    where it held, and stops there if the server ended it."""
    refused = 0
    for i in range(len(steps)):
        step = steps[i] if isinstance(steps, str) else steps[i : i + 1]
        address = session.address
        result = await session.step(step)
        if session.address != address:
            note_failover(session, address)
        if isinstance(steps, str):
            consumed = repr(shown_text(steps, i + 1, resumed))
        elif steps.ndim == 1:
            consumed = repr(f"token {i + 1}/{len(steps)} ({int(steps[i])})")
        else:
            consumed = repr(f"frame {i + 1}/{len(steps)}")
        if result.HasField("error"):
            refused += 1
            line.update(f"{consumed}  (refused: {result.error.code}: {result.error.message})")
        elif result.top:
            line.update(f"{consumed:<32} {format_top(result.top)}")
        if result.HasField("decision"):
            line.done()
            d = result.decision
            print(f"decided: {d.label} at step {d.step} (p={d.probability:.3f})"
                  f"{'; the server ended the session' if d.ended else ''}")  # fmt: skip
            if d.ended:
                break
        if delay_s:
            await asyncio.sleep(delay_s)
    return refused


def note_failover(session: StreamSession, was: str) -> None:
    """Say on stderr that the session moved to another replica (its stream broke)."""
    print(f"lstm-client: {was} failed; session continued on {session.address}", file=sys.stderr)


async def start_stream(
    client: LstmClient, args: argparse.Namespace, steps: str | np.ndarray
) -> StreamSession:
    """Open (or resume) the session once its model is known to take `steps`."""
    if not args.session:
        check_input(await client.get_model(args.model, args.version), steps, args.frames)
        decide = decision_rule(args.decide_at, args.end_when_decided) if args.decide_at else None
        return await client.open_session(
            args.model, version=args.version, top_k=args.top_k, decide=decide
        )
    session = await client.resume_session(args.session)  # on the first address that has it
    if session.address != client.addresses[0]:
        print(f"lstm-client: session resumed on {session.address}", file=sys.stderr)
    try:
        info = await client.get_model(session.opened.model, session.opened.version)
        check_input(info, steps, args.frames)
    except BaseException:
        await session.close()  # the session stays as it was, resumable
        raise
    return session


async def cmd_stream(client: LstmClient, args: argparse.Namespace) -> int:
    steps = read_steps(args)
    session = await start_stream(client, args, steps)
    print(f"session {session.session_id} {session.opened.model} v{session.opened.version}")
    line = LiveLine(sys.stdout)
    resumed = bool(args.session)
    refused = await stream_steps(session, steps, args.delay_ms / 1000, line, resumed)
    if session.ended_by_decision:
        await session.close()
        print(f"ended by its decision after {session.decided.total_steps} steps")  # type: ignore[union-attr]
    elif args.keep:
        line.done()
        await session.close()
        print(f"kept session {session.session_id} (resume with --session)")
    else:
        ended = await session.end()  # feeds what was held back
        if ended.flushed_steps and isinstance(steps, str):
            text = shown_text(steps, len(steps), resumed)
            line.update(f"{text!r:<32} {format_top(ended.top)}")
        line.done()
        print(f"ended after {ended.total_steps} steps")
    if refused:
        print(f"lstm-client: the server refused {refused} of {len(steps)} chunks", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-client", description=__doc__)
    parser.add_argument(
        "--address",
        action="append",
        default=None,
        help="server host:port; repeat for failover (default localhost:8001)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per unary call")
    add_security_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the served models")
    classify = sub.add_parser("classify", help="classify one whole text or file of frames")
    classify.add_argument("model")
    add_input_flags(classify.add_mutually_exclusive_group(required=True), "")
    classify.add_argument("--json", action="store_true", help="print JSON")
    stream = sub.add_parser("stream", help="stream text, token ids or frames one step at a time")
    stream.add_argument("model", nargs="?", default="", help="model (not with --session)")
    add_input_flags(stream.add_mutually_exclusive_group(required=True), ", one per chunk")
    stream.add_argument("--session", help="resume this session id instead of opening one")
    stream.add_argument("--keep", action="store_true", help="keep the session open at the end")
    stream.add_argument("--delay-ms", type=float, default=0.0, help="pause between characters")
    stream.add_argument(
        "--decide-at", metavar="P[,N]",
        help="early decision: top label probability >= P for N steps in a row (margin:M[,N]: "
        "beats the second label by M)",
    )  # fmt: skip
    stream.add_argument(
        "--end-when-decided", action="store_true", help="with --decide-at: end the session there"
    )
    for p in (classify, stream):
        p.add_argument("--version", type=int, default=0, help="model version (0 = latest)")
        p.add_argument("--top-k", type=int, default=1, help="labels to show")
    return parser


def add_input_flags(group: argparse._MutuallyExclusiveGroup, each: str) -> None:
    """What a request carries: text (a model with a tokenizer), token ids, or frames."""
    group.add_argument("--text", help=f"text for a token model with a tokenizer{each}")
    group.add_argument("--tokens", help=f'token ids, e.g. "3 17 5" (or 3,17,5){each}')
    group.add_argument("--tokens-file", type=Path, help=f"a file of token ids{each}")
    group.add_argument("--frames", type=Path, help=f".npy or .csv (T, F) frames{each}")


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """TLS and the bearer token (its value is never shown: no default in --help)."""
    parser.add_argument(
        "--tls", action="store_true", help="TLS, trusting the system's CAs (implied by --tls-ca)"
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM CA certificate(s) to trust: TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--server-name",
        help="the name the server's certificate is checked against (and SNI), instead of the "
        "address's host: e.g. the Service's name through kubectl port-forward to localhost",
    )
    parser.add_argument(
        "--token", default=None, help=f"bearer token sent on every call (default: ${TOKEN_ENV})"
    )


TOKEN_ENV = "LSTM_SERVE_TOKEN"
COMMANDS = {"list": cmd_list, "classify": cmd_classify, "stream": cmd_stream}


async def run(args: argparse.Namespace) -> int:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    async with LstmClient(
        args.address or ["localhost:8001"], timeout_s=args.timeout, tls=args.tls,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token,
        server_name=args.server_name,
    ) as client:  # fmt: skip
        return await COMMANDS[args.command](client, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lstm-client` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "stream" and not (args.model or args.session):
        print("lstm-client stream: give a model or --session", file=sys.stderr)
        return 2
    if args.server_name and not (args.tls or args.tls_ca or args.tls_cert):
        print("lstm-client: --server-name names the server's TLS certificate: give --tls or "
              "--tls-ca too", file=sys.stderr)  # fmt: skip
        return 2
    if args.command == "stream" and args.end_when_decided and not args.decide_at:
        print("lstm-client stream: --end-when-decided needs --decide-at", file=sys.stderr)
        return 2
    if args.command == "stream" and args.decide_at and args.session:
        print("lstm-client stream: --decide-at is for a new session (a resumed one keeps "
              "its rule)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        return asyncio.run(run(args))
    except grpc.aio.AioRpcError as exc:
        print(f"lstm-client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except SessionLost as exc:
        print(f"lstm-client: session lost: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"lstm-client: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Model control without a network: versions load, fail, drain and retire; latest follows."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.engine.types import ModelState, StreamOptions
from service.errors import ConfigError, ModelNotFound, Unavailable, VersionRetired
from tests.unit.engines import load_engine

TOKENS = np.array([1, 2, 3], dtype=np.int64)


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A repository holding tiny-gru version 1 only."""
    shutil.copytree(tiny_repo / "tiny-gru" / "1", tmp_path / "tiny-gru" / "1")
    return tmp_path


def add_version(repo: Path, version: int, source: int = 1) -> Path:
    target = repo / "tiny-gru" / str(version)
    shutil.copytree(repo / "tiny-gru" / str(source), target)
    return target


def test_a_new_version_becomes_latest_while_open_sessions_stay_pinned(repo: Path) -> None:
    engine = load_engine(repo, model_control="poll")

    async def main() -> None:
        old = await engine.open_session("tiny-gru", 0, StreamOptions())
        first = await engine.apply_chunk(old, 1, TOKENS[:2])
        add_version(repo, 2)
        report = await engine.control.scan()
        assert report.loaded == ["tiny-gru@2"]
        new = await engine.open_session("tiny-gru", 0, StreamOptions())
        assert (old.model.version, new.model.version) == (1, 2)
        second = await engine.apply_chunk(old, 2, TOKENS[2:])  # goes on, on version 1
        assert second.total_steps == 3 and first.result is not None
        assert engine.registry.is_latest(new.model) and not engine.registry.is_latest(old.model)

    asyncio.run(main())
    engine.close()


def test_a_corrupt_newer_version_is_reported_and_the_old_one_keeps_serving(repo: Path) -> None:
    engine = load_engine(repo, model_control="poll")
    broken = add_version(repo, 2) / "model.onnx"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated

    async def main() -> None:
        report = await engine.control.scan()
        [failed] = report.failed
        assert failed.version == 2 and failed.state is ModelState.UNAVAILABLE
        assert str(broken) in failed.reason
        assert engine.registry.get("tiny-gru").version == 1  # still the latest served
        assert engine.registry.failure("tiny-gru", 2) == failed
        assert not (await engine.control.scan()).failed  # not retried while the file is unchanged
        shutil.copy(repo / "tiny-gru" / "1" / "model.onnx", broken)  # fixed: loaded next scan
        assert (await engine.control.scan()).loaded == ["tiny-gru@2"]
        assert engine.registry.failure("tiny-gru", 2) is None

    asyncio.run(main())
    engine.close()


def test_a_removed_version_drains_then_retires_after_its_last_session(repo: Path) -> None:
    add_version(repo, 2)
    engine = load_engine(repo, model_control="poll")

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 2, StreamOptions())
        worker = session.model
        shutil.rmtree(repo / "tiny-gru" / "2")
        assert (await engine.control.scan()).draining == ["tiny-gru@2"]
        assert worker.lifecycle is ModelState.DRAINING
        with pytest.raises(Unavailable, match="draining"):
            await engine.open_session("tiny-gru", 2, StreamOptions())
        assert (await engine.open_session("tiny-gru", 0, StreamOptions())).model.version == 1
        await engine.apply_chunk(session, 1, TOKENS)  # its session goes on
        await engine.end(session)
        assert worker.lifecycle is ModelState.RETIRED and worker.state.allocated_bytes == 0
        with pytest.raises(ModelNotFound, match="no version 2"):
            engine.registry.find("tiny-gru", 2)

    asyncio.run(main())
    engine.close()


def test_explicit_mode_loads_and_unloads_on_request(repo: Path) -> None:
    engine = load_engine(repo, model_control="explicit")

    async def main() -> None:
        assert engine.registry.all() == []  # explicit: nothing at start
        with pytest.raises(ModelNotFound, match="not in the repository"):
            await engine.control.load("nope")
        await engine.control.load("tiny-gru")
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        assert await engine.control.unload("tiny-gru") == ["tiny-gru@1"]
        assert [s.state for s in engine.control.index()] == [ModelState.DRAINING]
        engine.control.retire_all()  # shutting down: its last session is closed with it
        with pytest.raises(VersionRetired):
            session.check_live()
        [row] = engine.control.index()
        assert (row.state, row.reason) == (ModelState.UNAVAILABLE, "not loaded")

    asyncio.run(main())
    engine.close()


def test_strict_start_names_the_file_that_failed(repo: Path) -> None:
    broken = repo / "tiny-gru" / "1" / "model.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(ConfigError, match=re.escape(str(broken))) as raised:
        load_engine(repo)
    assert "\n" not in str(raised.value)


def test_the_folder_names_the_model(repo: Path, tiny_repo: Path) -> None:
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", repo / "renamed" / "7")
    engine = load_engine(repo)
    worker = engine.registry.get("renamed")
    assert (worker.name, worker.version) == ("renamed", 7)
    assert worker.description.name == "tiny-lstm"  # informational only
    engine.close()


def test_loading_a_draining_model_again_serves_it_again_with_its_sessions(repo: Path) -> None:
    engine = load_engine(repo, model_control="explicit")

    async def main() -> None:
        await engine.control.load("tiny-gru")
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        await engine.apply_chunk(session, 1, TOKENS[:2])
        assert await engine.control.unload("tiny-gru") == ["tiny-gru@1"]
        with pytest.raises(Unavailable, match="draining"):
            await engine.open_session("tiny-gru", 1, StreamOptions())
        report = await engine.control.load("tiny-gru")  # Triton's load after unload
        assert report.serving_again == ["tiny-gru@1"] and report.loaded == []
        assert [s.state for s in engine.control.index()] == [ModelState.READY]
        again = await engine.open_session("tiny-gru", 0, StreamOptions())
        assert again.model is session.model  # the same version, not a second copy
        outcome = await engine.apply_chunk(session, 2, TOKENS[2:])  # its session went on
        assert outcome.total_steps == 3
        await engine.end(session)
        assert again.model.lifecycle is ModelState.READY  # no retirement on its last session

    asyncio.run(main())
    engine.close()


def test_a_version_folder_put_back_while_draining_serves_again(repo: Path, tmp_path: Path) -> None:
    add_version(repo, 2)
    engine = load_engine(repo, model_control="poll")
    aside = tmp_path.parent / f"{tmp_path.name}-aside"

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 2, StreamOptions())
        shutil.copytree(repo / "tiny-gru" / "2", aside)  # copy2: the same mtime and size
        shutil.rmtree(repo / "tiny-gru" / "2")
        assert (await engine.control.scan()).draining == ["tiny-gru@2"]
        shutil.move(aside, repo / "tiny-gru" / "2")
        report = await engine.control.scan()
        assert report.serving_again == ["tiny-gru@2"]
        assert session.model.lifecycle is ModelState.READY
        assert engine.registry.is_latest(session.model)

    asyncio.run(main())
    engine.close()


def test_a_draining_version_whose_file_changed_waits_for_its_sessions(repo: Path) -> None:
    engine = load_engine(repo, model_control="explicit")
    model_file = repo / "tiny-gru" / "1" / "model.onnx"

    async def main() -> None:
        await engine.control.load("tiny-gru")
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        await engine.control.unload("tiny-gru")
        model_file.write_bytes(model_file.read_bytes())  # a new file: another mtime
        with pytest.raises(Unavailable, match=r"draining \(tiny-gru@1, 1 sessions left\)"):
            await engine.control.load("tiny-gru")
        await engine.end(session)  # the last session: the old version retires
        report = await engine.control.load("tiny-gru")
        assert report.loaded == ["tiny-gru@1"]
        fresh = await engine.open_session("tiny-gru", 0, StreamOptions())
        assert fresh.model is not session.model

    asyncio.run(main())
    engine.close()

"""The house rules of shared/ARCHITECTURE.md, checked: no cycles, no forbidden arrows, small
classes. Read from the sources (no import runs): a failure names the file, line and import."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "lstmserve", "export", "bench")
MAX_CLASS_LINES = 200


def sources() -> dict[str, Path]:
    """Module name -> file, for our packages (generated stubs excluded)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if "v1" in rel.parts:
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def all_imports(path: Path, runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`: at module level or in a function body (a lazy
    import is still an import), under TYPE_CHECKING too unless `runtime_only`. `from a import b`
    gives both `a` and `a.b` (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    if runtime_only:
        skip = {id(n) for block in ast.walk(tree) if _type_checking_block(block)
                for n in ast.walk(block)}  # fmt: skip
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return sorted(found)


def imports_of(path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Our modules `path` imports at run time (TYPE_CHECKING blocks do not count) -> the line of
    the first such import."""
    lines: dict[str, int] = {}
    for line, name in all_imports(path, runtime_only=True):
        if name in modules:
            lines.setdefault(name, line)
    return lines


def _where(module: str, modules: dict[str, Path]) -> str:
    return str(modules[module].relative_to(ROOT))


def test_no_import_cycles() -> None:
    modules = sources()
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    for name, edges in graph.items():
        edges.pop(name, None)
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt]
                steps = [f"{_where(a, modules)}:{graph[a][b]} imports {b}"
                         for a, b in itertools.pairwise(cycle)]  # fmt: skip
                pytest.fail(f"import cycle: {' -> '.join(cycle)}\n  " + "\n  ".join(steps))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# (importer package, modules it must never import, why): ARCHITECTURE.md's forbidden arrows.
FORBIDDEN = [
    ("export", ("bench",), "export never imports bench (bench imports export)"),
    ("service", ("export", "torch"), "the serving path never imports torch or export"),
    ("service.engine", ("service.config",), "the engine is given its settings, not the config"),
    ("service.engine", ("service.metrics",), "the engine is given its metrics (EngineMetrics)"),
    *((package, ("tests",), "nothing imports the tests") for package in PACKAGES),
]


@pytest.mark.parametrize(("importer", "banned", "why"), FORBIDDEN,
                         ids=[f"{i}-not-{'-'.join(b)}" for i, b, _ in FORBIDDEN])  # fmt: skip
def test_no_forbidden_import(importer: str, banned: tuple[str, ...], why: str) -> None:
    found: dict[str, str] = {}  # file:line -> the first banned module it names
    for name, path in sources().items():
        if name != importer and not name.startswith(importer + "."):
            continue
        for line, module in all_imports(path):
            if any(module == b or module.startswith(b + ".") for b in banned):
                found.setdefault(f"{path.relative_to(ROOT)}:{line}", module)
    lines = [f"{where} imports {module}" for where, module in found.items()]
    assert not found, f"{why}:\n  " + "\n  ".join(lines)


def test_no_class_is_over_200_lines() -> None:
    big = []
    for name, path in sources().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    big.append(f"{name}.{node.name}: {lines} lines")
    assert not big, big


WIRE = ("grpc", "google.protobuf", "lstmserve.v1", "tritonclient")  # the wire's modules


@pytest.mark.parametrize("package", ["service.engine", "service.protocol"])
def test_engine_and_session_layer_name_no_wire_module_even_lazily(package: str) -> None:
    """No import of gRPC, protobuf or their generated messages anywhere in these modules, in a
    function body or under TYPE_CHECKING included (a lazy import is still an import)."""
    found = []
    for name, path in sources().items():
        if not name.startswith(package):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                named = [node.module]
            else:
                continue
            found += [f"{name}: {n}" for n in named if n.startswith(WIRE)]
    assert not found, found


def test_only_the_tracing_module_names_opentelemetry() -> None:
    """OpenTelemetry is the `tracing` extra: one module of the service imports it, loaded only
    with --trace-otlp-endpoint (service/server.py `build_tracing`); lstmserve (the client)
    and export never do (bench's OTLP sink may: bench/otlp_sink.py)."""
    found = []
    for name, path in sources().items():
        if name == "service.tracing_otel" or name.startswith("bench"):
            continue
        named = [(line, m) for line, m in all_imports(path) if m.startswith("opentelemetry")]
        found += [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in named]
    assert not found, found


# The engine's parts, lowest first (docs/ARCHITECTURE.md, "The engine's parts"): a part imports
# its own modules and the parts below it, never one above. `types` (the values that cross the
# engine's edge) is below every part; core, attach and chunks (the Engine) sit above them all.
ENGINE_PARTS = ("text", "compute", "byo", "session", "schedule", "model", "continuity")


def _engine_part(module: str) -> int | None:
    """The rank of the engine part `module` belongs to; None outside the parts."""
    parts = module.split(".")
    if parts[:2] != ["service", "engine"] or len(parts) < 4:
        return None
    return ENGINE_PARTS.index(parts[2]) if parts[2] in ENGINE_PARTS else None


def test_the_engine_parts_import_only_downwards() -> None:
    """At run time (TYPE_CHECKING imports are annotations only): no part imports a part above
    it or the Engine itself."""
    modules = sources()
    wrong = []
    for name, path in modules.items():
        rank = _engine_part(name)
        if rank is None:
            continue
        for line, target in all_imports(path, runtime_only=True):
            if not target.startswith("service.engine.") or target not in modules:
                continue
            if target == "service.engine.types":
                continue
            other = _engine_part(target)
            if other is None or other > rank:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({ENGINE_PARTS[rank]}) imports "
                             f"{target}")  # fmt: skip
    assert not wrong, "an engine part imports upwards:\n  " + "\n  ".join(wrong)


def test_every_engine_module_is_in_a_part_or_is_the_engine() -> None:
    engine = {"service.engine", "service.engine.types", "service.engine.core",
              "service.engine.attach", "service.engine.chunks"}  # fmt: skip
    parts = {f"service.engine.{part}" for part in ENGINE_PARTS}  # the packages themselves
    loose = [name for name in sources() if name.startswith("service.engine")
             and name not in engine | parts and _engine_part(name) is None]  # fmt: skip
    assert not loose, f"engine modules outside the parts: {loose}"

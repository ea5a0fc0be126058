"""docs/architecture.md's layer table matches the code: every module of
jpaged/ sits in exactly one row, every module it names exists, and each
module imports only modules of its own row or of the rows below it (the
front ends and the harness are one level; imports inside functions count)."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOP_LEVELS = ("front ends", "benchmark harness")  # side by side: one level


def layer_rows() -> list[tuple[str, set[str]]]:
    """(layer, the modules of its row) in the table's order, top first; a
    package (models, kernels_pallas, jpaged.bench) is one module."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = []
    for line in text.split("## Layers", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        names = set()
        found = re.findall(r"`([A-Za-z_/]+(?:\.py)?/?)`", cells[1])
        in_package = any(n.rstrip("/") in ("models", "kernels_pallas") for n in found)
        for name in found:
            if name.endswith(".py") and "/" not in name:
                if in_package:  # a file of that package (kernels_pallas/reference.py)
                    continue
                names.add("jpaged." + name[:-3])
            elif name.rstrip("/") in ("models", "kernels_pallas"):
                names.add(name.rstrip("/"))
            elif name.rstrip("/") == "jpaged/bench":
                names.add("jpaged.bench")
        rows.append((cells[0], names))
    return rows


def module_of(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "jpaged.bench" if parts[:2] == ("jpaged", "bench") else ".".join(parts)


def imported(path: pathlib.Path) -> set[str]:
    """This repo's modules a file imports (as the table names them)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] in ("models", "kernels_pallas"):
                out.add(parts[0])
            elif parts[0] == "jpaged" and len(parts) > 1:
                mod = "jpaged.bench" if parts[1] == "bench" else f"jpaged.{parts[1]}"
                if mod == "jpaged.bench" or (ROOT / "jpaged" / f"{parts[1]}.py").exists():
                    out.add(mod)
    return out


def test_every_module_is_in_one_row_and_every_named_one_exists():
    rows = layer_rows()
    assert [layer for layer, _ in rows][:2] == list(TOP_LEVELS)
    named = [m for _, mods in rows for m in mods]
    assert len(named) == len(set(named)), "a module sits in two rows"
    modules = {module_of(p) for p in (ROOT / "jpaged").glob("*.py") if p.name != "__init__.py"}
    modules |= {"jpaged.bench", "models", "kernels_pallas"}
    assert modules - set(named) == set(), "modules the table leaves out"
    assert set(named) - modules == set(), "modules the table names that do not exist"


def test_imports_go_down_the_table():
    rows = layer_rows()
    level = {}
    for i, (layer, mods) in enumerate(rows):
        for m in mods:
            level[m] = 0 if layer in TOP_LEVELS else i
    files = [p for p in (ROOT / "jpaged").rglob("*.py") if p.name != "__init__.py"]
    files += list((ROOT / "models").rglob("*.py")) + list((ROOT / "kernels_pallas").rglob("*.py"))
    upward = []
    for path in files:
        mod = module_of(path)
        mod = mod.split(".")[0] if mod.split(".")[0] in ("models", "kernels_pallas") else mod
        for target in imported(path) - {mod}:
            if level[target] < level[mod]:
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert upward == []

"""The layout rules of ../shared/DESIGN.md, checked on the source (``tools/structure.py`` prints the same)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "softprompt"


def _structure():
    spec = importlib.util.spec_from_file_location("structure", REPO / "tools" / "structure.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["structure"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


structure = _structure()


@pytest.fixture(scope="module")
def modules():
    return structure.read_modules(PACKAGE)


def test_no_module_outside_the_forward_package_asks_which_family_a_model_is(modules):
    found = [f"{m.name}:{n}: {s}" for m in modules.values() for n, s in m.family_checks]
    assert not found, "family decisions outside softprompt/forward/:\n" + "\n".join(found)


def test_the_family_package_exists_and_holds_the_decisions(modules):
    assert "softprompt.forward" in modules
    text = "\n".join(m.path.read_text() for m in modules.values() if m.name.startswith("softprompt.forward"))
    assert "is_encoder_decoder" in text  # the decision is made there, once


def test_module_sizes(modules):
    over = {m.name: m.lines for m in modules.values() if m.lines > structure.limit_for(m)}
    assert not over, f"modules over their limit (cli.py 300, others 450 lines): {over}"
    assert modules["softprompt.cli"].lines < 300


def test_no_private_name_is_imported_from_another_module(modules):
    found = [f"{m.name}:{n}: {name} from {src}" for m in modules.values() for n, src, name in m.private
             if src != m.name]
    assert not found, "\n".join(found)


def test_no_import_cycles_between_parts(modules):
    assert structure.cycles(structure.part_edges(modules)) == []


def test_server_assembly_lives_in_the_server_package_and_cli_holds_no_workflow(modules):
    cli = modules["softprompt.cli"].path.read_text()
    assert "def build_app" not in cli and "create_app(" not in cli
    assert "save_prompt(" not in cli and "evaluate_on_engine(" not in cli


def _readme_layout() -> set[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1]
    block = section.split("```", 2)[1]
    names = set()
    for line in block.splitlines()[1:]:
        m = re.match(r"^  ([A-Za-z_][\w.]*/?)", line)  # entries of softprompt/, indented two spaces
        if m:
            names.add(m.group(1))
    return names


def test_readme_layout_lists_every_part_of_the_package_and_nothing_else():
    actual = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    actual |= {p.name for p in PACKAGE.glob("*.py")}
    listed = _readme_layout()
    assert listed == actual, (f"README layout lacks {sorted(actual - listed)}; lists what is not there: "
                              f"{sorted(listed - actual)}")


def test_the_structure_tool_finds_what_it_checks(tmp_path):
    """The rules above can fail: a family probe, a private import and a long module are all reported."""
    pkg = tmp_path / "softprompt"
    (pkg / "forward").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "forward" / "__init__.py").write_text("def family_of(m):\n    return m.config.is_encoder_decoder\n")
    (pkg / "engine.py").write_text("from softprompt.train import _helper\n\n"
                                   "def f(model):\n    return model.config.is_encoder_decoder\n")
    (pkg / "train.py").write_text("import softprompt.engine\n\ndef _helper():\n    pass\n" + "x = 1\n" * 460)
    mods = structure.read_modules(pkg)
    assert [n for n, _ in mods["softprompt.engine"].family_checks] == [4]
    assert mods["softprompt.forward"].family_checks == []
    assert mods["softprompt.engine"].private == [(1, "softprompt.train", "_helper")]
    assert mods["softprompt.train"].lines > structure.limit_for(mods["softprompt.train"])
    assert structure.cycles(structure.part_edges(mods)) == [["engine", "train"]]


def test_the_readme_api_imports_give_what_they_name_not_a_submodule():
    """`from softprompt import ..., train` gave the ``softprompt.train`` module, not the function: importing a
    submodule sets it as the package's attribute of that name, so the lazy export was never asked, and the
    README's Python API snippet failed at ``train(...)`` ('module' object is not callable)."""
    import types

    import softprompt
    import softprompt.workflows  # noqa: F401  (imports the submodules, softprompt.train among them)

    block = (REPO / "README.md").read_text().split("\n## Python API", 1)[1].split("```python", 1)[1].split("```")[0]
    imports = "\n".join(re.findall(r"^(?:import|from) [^\n(]*(?:\([^)]*\))?", block, re.M))
    namespace: dict = {}
    exec(imports, namespace)
    names = [n for n in namespace if not n.startswith("__")]
    assert "train" in names and "save_prompt" in names
    assert not [n for n in names if n != "torch" and isinstance(namespace[n], types.ModuleType)]
    assert not [n for n in softprompt.__all__ if isinstance(getattr(softprompt, n), types.ModuleType)]

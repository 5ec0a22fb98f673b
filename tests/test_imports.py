"""The house README draws: five files on top, machinery/ below them, imports one way and no circle."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = {"vit", "mlcak", "data", "train", "evaluate"}


def project_imports():
    """{module: set of project modules it imports}, read from the source (AST), for the top level and machinery/."""
    files = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    files.update({f"machinery.{name[:-3]}": os.path.join(ROOT, "machinery", name)
                  for name in os.listdir(os.path.join(ROOT, "machinery")) if name.endswith(".py") and name != "__init__.py"})
    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from machinery import layouts
        graph[module] = {m for m in found if m in files}
    return graph


def test_the_top_level_holds_the_five_files_and_everything_else_is_in_machinery():
    assert {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} == TOP


def test_vit_and_mlcak_import_torch_alone_and_machinery_never_imports_the_scripts_or_data():
    graph = project_imports()
    assert graph["vit"] == set() and graph["mlcak"] == set()
    for module, imports in graph.items():
        if module.startswith("machinery.") and module != "machinery.bench":  # the benchmark runs train.py's own loop
            assert not imports & {"train", "evaluate", "data"}, (module, imports)
    for name in ("vit.py", "mlcak.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert roots <= {"torch", "math", "dataclasses"}, (name, roots)


def test_no_module_imports_itself_through_a_circle():
    graph = project_imports()

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and (seen.add(nxt) or reaches(nxt, target, seen))):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []

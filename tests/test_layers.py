"""
The house's rooms import in one direction only.

Read from the source with L{ast}, so a forbidden import fails here even
where no test happens to run the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import tentacle

PACKAGE = Path(tentacle.__file__).parent


def imports_of(path: Path) -> set[str]:
    """
    Every C{tentacle...} module a file imports, at any depth of the file.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "tentacle" or name.startswith("tentacle.")}


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


class LayerTests(SynchronousTestCase):
    def assert_no_import(self, files: list[Path], allowed: tuple[str, ...] = (), forbidden: tuple[str, ...] = ()) -> None:
        self.assertTrue(files)
        for path in files:
            for name in imports_of(path):
                if allowed:
                    self.assertTrue(
                        name.startswith(allowed),
                        f"{path.relative_to(PACKAGE.parent)} imports {name}, above its layer",
                    )
                for bad in forbidden:
                    self.assertFalse(
                        name == bad or name.startswith(bad + "."),
                        f"{path.relative_to(PACKAGE.parent)} imports {name}",
                    )

    def test_halibut_imports_nothing_above_it(self) -> None:
        self.assert_no_import(modules_under("halibut"), allowed=("tentacle.halibut",))

    def test_services_do_not_reach_the_transport(self) -> None:
        self.assert_no_import(
            modules_under("services") + modules_under("workers") + [PACKAGE / "dispatch.py"],
            forbidden=("tentacle.listener", "tentacle.service", "tentacle.dialer", "tentacle.client"),
        )

    def test_the_client_does_not_import_the_agent(self) -> None:
        self.assert_no_import(
            modules_under("client"),
            forbidden=(
                "tentacle.listener", "tentacle.service", "tentacle.services", "tentacle.workers",
                "tentacle.dispatch", "tentacle.workspace",
            ),
        )

    def test_the_finder_sees_imports(self) -> None:
        """
        A check of the check: it finds the imports it looks for.
        """
        self.assertIn("tentacle.halibut.connection", imports_of(PACKAGE / "listener.py"))
        self.assertIn("tentacle.dialer", imports_of(PACKAGE / "client" / "api.py"))

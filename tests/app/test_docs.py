"""docs/api.md stays in step with the code: every setting and every route is documented."""
from pathlib import Path

from app.settings import ApiSettings
from worker.settings import WorkerSettings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    names = {f"`STAR_{name.upper()}`" for cls in (ApiSettings, WorkerSettings) for name in cls.model_fields}
    missing = [name for name in sorted(names) if f"| {name} |" not in DOC]
    assert not missing, missing


def test_every_route_is_documented():
    """The routes app.main defines (other modules' routers are documented with them)."""
    from app.main import create_app

    routes = {(method, route.path) for route in create_app().routes
              if getattr(getattr(route, "endpoint", None), "__module__", "") == "app.main"
              and route.path != "/" for method in route.methods - {"HEAD"}}
    assert len(routes) >= 8
    missing = [f"{m} {p}" for m, p in sorted(routes) if f"{m} {p}" not in DOC]
    assert not missing, missing

"""The deployment files agree with the code and with README.

No Heroku and no Docker engine runs here, so what can be read is checked:
app.json's variables are the ones the settings read, the Procfile's commands
are README's and the image's, and Redis is started with noeviction.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import yaml

from app.settings import DEFAULT_JOB_TIMEOUT_SECONDS, load_settings
from tests.harness import ROOT


class _Recording(dict):
    """An empty environment that remembers every variable asked for."""

    def __init__(self):
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)


def settings_variables() -> set[str]:
    environ = _Recording()
    load_settings(environ)
    return environ.asked


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_app_json_offers_every_setting_and_the_add_on_sets_redis_url():
    app = json.loads((ROOT / "app.json").read_text())

    # REDIS_URL comes from the Heroku Redis add-on, not from the person;
    # gunicorn.conf.py reads the web process's own two.
    web = {"WEB_CONCURRENCY", "WEB_THREADS"}
    assert set(app["env"]) == settings_variables() - {"REDIS_URL"} | web
    assert all(entry["description"] for entry in app["env"].values())
    assert app["env"]["REDIS_TLS_VERIFY"]["value"] == "false"
    assert [a["plan"].split(":")[0] for a in app["addons"]] == ["heroku-redis"]
    assert set(app["formation"]) == set(procfile()) - {"release"}


def test_readme_documents_every_setting():
    table = readme_section("Configuration")

    missing = [n for n in sorted(settings_variables()) if f"`{n}`" not in table]

    assert missing == []


def test_procfile_commands_are_the_ones_readme_documents():
    commands = procfile()
    production = readme_section("Running in production")

    assert set(commands) == {"release", "web", "worker"}
    assert commands["release"] == "python -m app check"
    for command in commands.values():
        assert f"`{command}`" in production


def test_python_version_is_one_for_heroku_and_the_image():
    version = (ROOT / ".python-version").read_text().strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())

    # Heroku's buildpack takes the major version and installs its newest patch.
    assert re.fullmatch(r"3\.\d+", version)
    assert project["project"]["requires-python"] == f">={version}"
    assert f"FROM python:{version}-slim\n" in dockerfile()


def test_image_runs_the_procfile_web_command_unprivileged_with_a_health_check():
    text = dockerfile()
    cmd = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1)
    user = re.search(r"^USER (\S+)$", text, re.MULTILINE).group(1)

    assert json.loads(cmd) == shlex.split(procfile()["web"])
    assert user not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.MULTILINE)
    assert "COPY . " not in text and "COPY tests" not in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var", "tests"} <= set(ignored)


def test_compose_runs_the_procfile_commands_on_a_redis_that_keeps_events():
    services = compose()["services"]
    commands = {k: shlex.split(v) for k, v in procfile().items()}
    redis = services["redis"]["command"]

    assert services["check"]["command"] == commands["release"]
    assert "command" not in services["web"]  # the image's CMD, checked above
    assert services["worker"]["command"] == commands["worker"]
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis[redis.index("--appendonly") + 1] == "yes"
    for name in ("web", "worker"):
        assert services[name]["depends_on"]["check"] == {
            "condition": "service_completed_successfully"
        }
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://")
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > DEFAULT_JOB_TIMEOUT_SECONDS

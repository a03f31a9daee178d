"""Test sessions: one per distribution in its own virtualenv, plus core-only, lint, typecheck and bench.

Each session installs only the distributions it tests (with their declared
dependencies), so an undeclared dependency fails the session. Plugin loading
is strict in every session: a plugin that fails to load fails the run.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "typecheck", "core_only", "core"]

TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100"]
STRICT = {"TENSAFE_STRICT_PLUGINS": "1"}
THIRD_PARTY_PLUGIN = "tests/plugins/tensafe-bigram"
#: tests/<folder> for each plugin distribution, once it exists in the tree.
PLUGIN_TESTS = {
    "tensafe-privacy": "privacy",
    "tensafe-torch": "torch",
    "tensafe-tgsp": "tgsp",
    "tensafe-he-seal": "he_seal",
}
#: Local distributions a plugin depends on (installed from the tree, not from an index).
LOCAL_DEPENDENCIES = {"tensafe-torch": ["./tensafe-privacy"]}
#: Local distributions a plugin's tests need beside it: `tensafe he pack` packs through the TGSP loader, and
#: HE inference over HTTP (tests/he_seal/test_http.py) runs `tensafe serve` on the torch backend's embedded model.
TEST_DEPENDENCIES = {"tensafe-he-seal": ["./tensafe-tgsp", "./tensafe-privacy", "./tensafe-torch"]}
#: tensafe-core's extras a plugin's session installs (default: the conformance suite only).
CORE_EXTRAS = {"tensafe-he-seal": "testing,server"}
#: Installed first: the CPU build of torch, so that no multi-GB CUDA build is pulled in.
PREINSTALL = {"tensafe-torch": ["torch==2.13.0"], "tensafe-he-seal": ["torch==2.13.0"]}
#: Distributions whose dependencies include Pyfhel, which installs from the cached wheel (see _install_pyfhel).
NEEDS_PYFHEL = {"tensafe-he-seal"}
PYFHEL = "pyfhel==3.5.0"
PRESENT = [dist for dist in PLUGIN_TESTS if (ROOT / dist / "pyproject.toml").is_file()]
nox.options.sessions += [f"plugin({dist})" for dist in PRESENT]
if "tensafe-torch" in PRESENT:
    nox.options.sessions += ["e2e", "server"]

CORE_ONLY_TESTS = [
    "tests/core/test_core_only.py",
    "tests/core/test_config.py",
    "tests/core/test_types.py",
    "tests/core/test_registry.py",
]


def _install_pyfhel(session: nox.Session) -> None:
    """Pyfhel from the offline wheel cache, building the wheel once (tensafe-he-seal/scripts/build_pyfhel_wheel.sh)."""
    python = str(Path(session.virtualenv.bin) / "python")
    script = str(ROOT / "tensafe-he-seal" / "scripts" / "build_pyfhel_wheel.sh")
    cache = session.run("bash", script, python, external=True, silent=True)
    assert isinstance(cache, str)
    session.install("--find-links", cache.strip().splitlines()[-1], PYFHEL)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on tensafe-core."""
    session.install("mypy>=1.10", "numpy>=1.24", "./tensafe-core[testing,server,postgres]")
    session.run("mypy")


@nox.session
def core_only(session: nox.Session) -> None:
    """tensafe-core alone: no plugin distribution installed."""
    session.install("./tensafe-core[testing]")
    session.run("pytest", *CORE_ONLY_TESTS, *session.posargs, env=STRICT)


CHROMIUM_ENV = "TENSAFE_TEST_CHROMIUM"
CHROMIUM_SCRIPT = "scripts/chromium-for-tests.sh"


def _chromium(session: nox.Session) -> dict[str, str]:
    """The browser the report picture test renders report.html in: given, on PATH, or installed by the script."""
    import os
    import shutil
    import subprocess

    found = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium")
    if not found:
        result = subprocess.run(["bash", str(ROOT / CHROMIUM_SCRIPT)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            session.warn(f"{CHROMIUM_SCRIPT} failed (the report picture test will fail):\n{result.stderr}")
            return {}
        found = result.stdout.strip().splitlines()[-1]
    return {CHROMIUM_ENV: found}


@nox.session
def core(session: nox.Session) -> None:
    """tensafe-core with the third-party-style plugin from tests/plugins; report.html renders in Chromium."""
    session.install("./tensafe-core[testing]", f"./{THIRD_PARTY_PLUGIN}")
    session.run("pytest", "tests/core", *session.posargs, env={**STRICT, **_chromium(session)})


@nox.session
@nox.parametrize("dist", PRESENT or ["none"], ids=PRESENT or ["none"])
def plugin(session: nox.Session, dist: str) -> None:
    """One plugin distribution with tensafe-core, in its own virtualenv."""
    if dist == "none":
        session.skip("no plugin distribution in the tree yet")
    if dist in PREINSTALL:
        session.install(*PREINSTALL[dist])
    if dist in NEEDS_PYFHEL:
        _install_pyfhel(session)
    session.install(
        f"./tensafe-core[{CORE_EXTRAS.get(dist, 'testing')}]",
        *LOCAL_DEPENDENCIES.get(dist, []),
        *TEST_DEPENDENCIES.get(dist, []),
        f"./{dist}",
        f"./{THIRD_PARTY_PLUGIN}",
        *TEST_TOOLS,
    )
    session.run("pytest", f"tests/{PLUGIN_TESTS[dist]}", *session.posargs, env=STRICT)


@nox.session
def e2e(session: nox.Session) -> None:
    """Every distribution together, as a user installs them: the default `tensafe run` end to end."""
    session.install(*PREINSTALL["tensafe-torch"])
    if NEEDS_PYFHEL & set(PRESENT):
        _install_pyfhel(session)
    session.install("./tensafe-core[testing]", *[f"./{d}" for d in PRESENT], *TEST_TOOLS)
    session.run("pytest", "tests/e2e", *session.posargs, env=STRICT)


POSTGRES_URL_ENV = "TENSAFE_TEST_POSTGRES_URL"
POSTGRES_SCRIPT = "scripts/postgres-for-tests.sh"


def _postgres_url(session: nox.Session) -> str | None:
    """The PostgreSQL URL to test against: given in the environment, or started by the script when possible."""
    import os
    import shutil
    import subprocess

    if os.environ.get(POSTGRES_URL_ENV):
        return os.environ[POSTGRES_URL_ENV]
    has_postgres = any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not has_postgres and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        session.warn(f"no PostgreSQL and no way to install it: testing SQLite only (set {POSTGRES_URL_ENV})")
        return None
    result = subprocess.run(["bash", str(ROOT / POSTGRES_SCRIPT)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        session.error(f"{POSTGRES_SCRIPT} failed:\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


@nox.session
def server(session: nox.Session) -> None:
    """tensafe serve and the SDK (core[server,postgres] with privacy, torch, tgsp), on SQLite and PostgreSQL."""
    session.install(*PREINSTALL["tensafe-torch"])
    session.install(
        "./tensafe-core[testing,server,postgres]",
        "./tensafe-privacy",
        "./tensafe-torch",
        "./tensafe-tgsp",
        f"./{THIRD_PARTY_PLUGIN}",
        *TEST_TOOLS,
    )
    env = dict(STRICT)
    url = _postgres_url(session)
    if url:
        env[POSTGRES_URL_ENV] = url
    session.run("pytest", "tests/server", "tests/sdk", *session.posargs, env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (not run by default): each prints ratios against a baseline run in the same process."""
    if "tensafe-torch" in PRESENT:
        session.install(*PREINSTALL["tensafe-torch"])
    if NEEDS_PYFHEL & set(PRESENT):
        _install_pyfhel(session)
    # TenSEAL is the HE-LoRA benchmark's baseline only; no distribution depends on it.
    session.install("./tensafe-core[server]", f"./{THIRD_PARTY_PLUGIN}", *[f"./{d}" for d in PRESENT], "tenseal")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        session.run("python", str(script.relative_to(ROOT)), env=STRICT)

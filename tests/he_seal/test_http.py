"""HE-LoRA across a real trust boundary: `tensafe serve` evaluates, the SDK (or `tensafe inference --he
--server`) holds the key and answers each turn over HTTP.

Checked through the user's doors (the SDK, the CLI, HTTP): generation equals plaintext LoRA on the
embedded model (greedy, 32 tokens; log-probabilities within LOGPROB_BOUND) for both adapter kinds (a PEFT
directory encrypted by the client; an HE-encrypted TGSP package from `tensafe he pack`); no request body
the server received and nothing it persisted holds the secret key or any A or B value; another tenant's
turn is the same 404 as an absent session's; malformed, misbound and oversized turns are 4xx, never 500.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner

from tensafe.config import DPConfig, RunConfig
from tensafe.errors import TensafeError
from tensafe.he.messages import LoraResponse, Turn
from tensafe.he.peft import read_peft_lora
from tensafe.sdk import TenSafeClient
from tensafe.sdk.he_inference import HEInferenceSession
from tensafe.server.app import create_app
from tensafe.server.auth import create_key
from tensafe.server.service import SessionService
from tensafe.testing import fresh_plugin_manager
from tensafe.types import AdamParams, SamplingParams, datum_from_sequence
from tests.serving import free_port

#: Log-probabilities of the generated tokens, HE over HTTP against plaintext LoRA (tests/e2e's logit bound).
LOGPROB_BOUND = 1e-3
PROMPT = "Record 1. Name:"
LORA = {"rank": 4, "seed": 0, "target_modules": ["q_proj", "v_proj"]}
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, stop=[])
PASSPHRASE = "the key owner's passphrase"
LAYERS = 4  # the embedded model's


def torch_backend() -> Any:
    backend = fresh_plugin_manager(autoload=True).registry.ml_backend("torch")
    backend.initialize_model(RunConfig(backend="torch", dp=DPConfig(enabled=False), lora=LORA, training={"seed": 0}))
    return backend


class Capture:
    """ASGI middleware keeping every request body the server receives (test code only)."""

    def __init__(self, app: Any, bodies: list[bytes]) -> None:
        self.app = app
        self.bodies = bodies

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recording() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.bodies.append(b"".join(parts))
            return message

        await self.app(scope, recording, send)


@dataclass
class Server:
    service: SessionService
    url: str
    keys: dict[str, str]
    producer: dict[str, Path]
    bodies: list[bytes] = field(default_factory=list)
    app: Any = None

    def client(self, tenant: str = "alice") -> TenSafeClient:
        return TenSafeClient(self.url, self.keys[tenant])

    def post(self, tenant: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}/api/v1{path}", headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tensafe_tgsp import keygen

    root = tmp_path_factory.mktemp("he-server")
    producer = keygen(root / "producer-keys", "producer")
    service = SessionService(
        root / "data",
        plugin_manager=fresh_plugin_manager(autoload=True),
        trusted_signers=[producer["signing_public_key"]],
    )
    keys = {}
    with service.db() as db:
        for tenant in ("alice", "bob"):
            keys[tenant] = create_key(db, service.keyring, tenant)[1]
    bodies: list[bytes] = []
    app = create_app(service)
    port = free_port()
    config = uvicorn.Config(Capture(app, bodies), host="127.0.0.1", port=port, log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield Server(service, f"http://127.0.0.1:{port}", keys, producer, bodies, app)
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        service.close()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained a few steps on the embedded model, so that it changes its outputs."""
    backend = torch_backend()
    data = [datum_from_sequence(backend.encode("Record 1. Name: Ada Costa. Born: 1950. City: Lyon."))]
    for _ in range(2):
        backend.forward_backward(data, "cross_entropy")
        backend.optim_step(AdamParams(learning_rate=0.05))
    directory = tmp_path_factory.mktemp("adapter")
    backend.export_adapter(directory)
    return directory


@pytest.fixture(scope="module")
def plaintext(adapter: Path) -> Any:
    """Local plaintext LoRA generation with the same adapter: what the server must reproduce."""
    backend = torch_backend()
    base = backend.sample([backend.encode(PROMPT)], GREEDY)[0].sequences[0]
    backend.load_adapter(adapter)
    sequence = backend.sample([backend.encode(PROMPT)], GREEDY)[0].sequences[0]
    assert sequence.tokens != base.tokens  # the adapter matters
    return sequence


@pytest.fixture(scope="module")
def package(server: Server, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An HE-encrypted TGSP package made by `tensafe he pack`, encrypted to alice's server-held recipient key."""
    from tensafe.cli.main import cli

    root = tmp_path_factory.mktemp("package")
    with server.client() as client:
        recipient = root / "server-recipient.pub"
        recipient.write_text(client.tenant_keys().recipient_public_key)
    output, state = root / "adapter.tgsp", root / "owner.state"
    args = ["he", "pack", str(adapter), "-o", str(output), "--state", str(state), "--passphrase-env", "OWNER_PASS"]
    args += ["--signing-key", str(server.producer["signing_key"]), "--recipient", str(recipient)]
    result = CliRunner().invoke(
        cli, args, obj={"pm": fresh_plugin_manager(autoload=True)}, env={"OWNER_PASS": PASSPHRASE}
    )
    assert result.exit_code == 0, result.output
    return output, state


@dataclass
class Run:
    session: HEInferenceSession
    sequence: Any


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[TenSafeClient]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def runs(client: TenSafeClient, adapter: Path, package: tuple[Path, Path]) -> dict[str, Run]:
    """One greedy 32-token generation per adapter kind, each through the SDK against the live server."""
    out = {}
    session = client.create_he_inference_session(adapter=adapter)
    out["peft"] = Run(session, session.generate([PROMPT], GREEDY)[0].sequences[0])
    path, state = package
    session = client.create_he_inference_session(adapter=path, key_owner_state=state, passphrase=PASSPHRASE)
    out["tgsp"] = Run(session, session.generate([PROMPT], GREEDY)[0].sequences[0])
    return out


# -- (a) the same generation as plaintext LoRA --------------------------------------------


@pytest.mark.parametrize("kind", ["peft", "tgsp"])
def test_generation_over_http_equals_plaintext_lora(runs: dict[str, Run], plaintext: Any, kind: str) -> None:
    run = runs[kind]
    assert len(run.sequence.tokens) == 32 and run.sequence.tokens == plaintext.tokens
    assert run.sequence.text == plaintext.text
    error = np.max(np.abs(np.array(run.sequence.logprobs) - np.array(plaintext.logprobs)))
    assert error <= LOGPROB_BOUND, error


def test_modules_reading_the_same_input_share_a_round_trip(runs: dict[str, Run]) -> None:
    """q_proj and v_proj read the same hidden state: after the first forward pass (which learns that), one
    round per layer and token, not one per module."""
    stats = runs["peft"].session.last
    forwards = 32  # the prompt's, then one per generated token but the last
    assert LAYERS * forwards <= stats.turns <= LAYERS * (forwards + 1)
    assert stats.sent > 0 and stats.received > stats.sent and stats.key_owner_cpu_s > 0


# -- (b) what the server receives and keeps -----------------------------------------------


def _patterns(adapter: Path) -> dict[str, bytes]:
    """Byte patterns of several A and B entries: float64 values, and float32 pairs as PEFT stores them."""
    modules, _ = read_peft_lora(adapter)
    patterns = {}
    for name, (a, b, _) in sorted(modules.items())[:2]:
        for label, matrix in (("A", a), ("B", b), ("B^T", b.T)):
            for i, j in ((0, 0), (1, 2), (matrix.shape[0] - 1, matrix.shape[1] - 3)):
                patterns[f"{name} {label}[{i},{j}] f64"] = np.float64(matrix[i, j]).astype("<f8").tobytes()
                pair = np.ascontiguousarray(matrix[i, j : j + 2], dtype="<f4").tobytes()
                patterns[f"{name} {label}[{i},{j}:{j + 2}] f32"] = pair
    return patterns


def _secret_stretches(session: HEInferenceSession) -> dict[str, bytes]:
    secret = session.key_owner.backend.serialize_key("secret")
    return {f"secret[{start}:+64]": secret[start : start + 64] for start in (256, len(secret) // 2, len(secret) - 512)}


def _persisted(server: Server, tmp_path: Path) -> list[tuple[str, bytes]]:
    """Everything the server keeps: database rows, data directory files, and each artifact decrypted; a stored
    TGSP package also opened with the tenant's keys."""
    from sqlalchemy import text

    from tensafe.server.db import ArtifactRow, Base

    service = server.service
    kept: list[tuple[str, bytes]] = []
    with service.db() as db:
        for table in Base.metadata.sorted_tables:
            for row in db.execute(text(f"SELECT * FROM {table.name}")):
                kept.append(
                    (
                        f"row of {table.name}",
                        repr(tuple(row)).encode() + b"".join(v for v in row if isinstance(v, bytes)),
                    )
                )
        artifacts = db.query(ArtifactRow).all()
        for artifact in artifacts:
            data = service.store.read(db, artifact.tenant_id, artifact.id, service.tenant_key(db, artifact.tenant_id))
            kept.append((f"artifact {artifact.kind}", data))
            if artifact.kind == "tgsp":
                opened = tmp_path / artifact.id
                loader = service.tgsp.loader()
                with service.tgsp.workspace() as directory, service.tgsp.files(artifact.tenant_id, directory) as keys:
                    package = directory / "p.tgsp"
                    package.write_bytes(data)
                    loader.load(
                        package,
                        recipient_key=keys.recipient_key,
                        trusted_signers=[keys.signing_public_key, *service.tgsp.trusted_signers],
                        destination=opened,
                    )
                kept += [(f"opened package file {p.name}", p.read_bytes()) for p in opened.rglob("*") if p.is_file()]
    kept += [(str(p), p.read_bytes()) for p in service.data_dir.rglob("*") if p.is_file()]
    return kept


def test_server_never_receives_or_keeps_a_secret_key_or_adapter_values(
    server: Server, runs: dict[str, Run], adapter: Path, tmp_path: Path
) -> None:
    patterns = _patterns(adapter)
    stored = (adapter / "adapter_model.safetensors").read_bytes()
    # the float32 patterns of A and B rows are what the adapter file holds: a search that can find them
    assert all(p in stored for label, p in patterns.items() if label.endswith("f32") and "B^T" not in label)
    for run in runs.values():
        patterns.update(_secret_stretches(run.session))
    assert len(server.bodies) > 2 * LAYERS * 32  # every turn's answer, both uploads, the session creations
    received = sum(len(b) for b in server.bodies)
    assert received > 10_000
    for body in server.bodies:
        for label, pattern in patterns.items():
            assert pattern not in body, f"a request body holds {label}"
    kept = _persisted(server, tmp_path)
    assert any(label.startswith("opened package file he_adapter") for label, _ in kept)
    assert any(label == "artifact he-adapter" for label, _ in kept)
    for where, data in kept:
        for label, pattern in patterns.items():
            assert pattern not in data, f"{where} holds {label}"


def test_the_audit_chain_records_each_he_step_without_plaintext(server: Server, runs: dict[str, Run]) -> None:
    headers = {"Authorization": f"Bearer {server.keys['alice']}"}
    records = httpx.get(f"{server.url}/api/v1/audit", headers=headers).json()
    operations = [r["operation"] for r in records]
    assert {"he.adapter.upload", "package.upload", "inference.he.create", "inference.he.generate"} <= set(operations)
    sessions = {run.session.session_id for run in runs.values()}
    assert sessions <= {r["subject"] for r in records if r["operation"] == "inference.he.create"}
    # each record holds keyed digests, never the prompt
    assert all(PROMPT not in json.dumps(r) for r in records)
    assert httpx.get(f"{server.url}/api/v1/audit/verify", headers=headers).json()["ok"]


def test_he_sessions_are_listed_and_not_served_as_plaintext_inference(server: Server, runs: dict[str, Run]) -> None:
    headers = {"Authorization": f"Bearer {server.keys['alice']}"}
    listed = httpx.get(f"{server.url}/api/v1/sessions", headers=headers).json()
    session_id = runs["peft"].session.session_id
    assert {"session_id": session_id, "kind": "he-inference"}.items() <= next(
        s for s in listed if s["session_id"] == session_id
    ).items()
    assert runs["peft"].session.info().kind == "he-inference"
    # the plaintext inference routes do not reach an HE session (which has no plaintext adapter to serve)
    assert httpx.get(f"{server.url}/api/v1/inference/{session_id}", headers=headers).status_code == 404
    generate = server.post("alice", f"/inference/{session_id}/generate", json={"prompts": [PROMPT]})
    assert generate.status_code == 404


def test_key_owner_refuses_to_send_its_secret_key(
    server: Server, runs: dict[str, Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    session = runs["peft"].session
    secret = session.key_owner.backend.serialize_key("secret")
    received = len(server.bodies)
    with monkeypatch.context() as patched:
        patched.setattr(LoraResponse, "to_bytes", lambda self: b"leak" + secret)
        with pytest.raises(TensafeError, match="secret key"):
            session.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, stop=[]))
    assert all(secret[256:320] not in body for body in server.bodies[received:])
    # the refused generation was cancelled on the server: the session generates again at once
    assert session.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, stop=[]))[0].sequences


# -- (c) tenants, bindings and hostile turns ----------------------------------------------


def _same_as_absent(server: Server, session_id: str, method: str, suffix: str, **kwargs: Any) -> None:
    absent = "0" * 32
    headers = {"Authorization": f"Bearer {server.keys['bob']}"}
    theirs = httpx.request(method, f"{server.url}/api/v1/he/sessions/{session_id}{suffix}", headers=headers, **kwargs)
    nothing = httpx.request(method, f"{server.url}/api/v1/he/sessions/{absent}{suffix}", headers=headers, **kwargs)
    assert theirs.status_code == nothing.status_code == 404
    assert theirs.json() == json.loads(nothing.text.replace(absent, session_id))


def _start(server: Server, session_id: str) -> Turn:
    body = {"prompts": [PROMPT], "sampling_params": {"max_tokens": 2, "temperature": 0.0, "stop": []}}
    response = server.post("alice", f"/he/sessions/{session_id}/generate", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    return Turn.from_bytes(response.content)


def _finish(server: Server, session: HEInferenceSession, turn: Turn) -> dict[str, Any]:
    while True:
        answer = Turn(turn.session_id, turn.generation_id, turn.turn, session.key_owner.handle(turn.payload))
        response = server.post("alice", f"/he/sessions/{session.session_id}/turn", content=answer.to_bytes())
        assert response.status_code == 200, response.text
        if response.headers["content-type"] != "application/octet-stream":
            result: dict[str, Any] = response.json()
            return result
        turn = Turn.from_bytes(response.content)


def test_another_tenants_turn_is_the_same_404_as_an_absent_session(server: Server, runs: dict[str, Run]) -> None:
    session = runs["peft"].session
    turn = _start(server, session.session_id)
    answer = Turn(turn.session_id, turn.generation_id, turn.turn, session.key_owner.handle(turn.payload)).to_bytes()
    _same_as_absent(server, session.session_id, "POST", "/turn", content=answer)
    _same_as_absent(server, session.session_id, "POST", "/generate", json={"prompts": [PROMPT]})
    _same_as_absent(server, session.session_id, "GET", "")
    _same_as_absent(server, session.session_id, "DELETE", "/generation")
    unauthenticated = httpx.post(f"{server.url}/api/v1/he/sessions/{session.session_id}/turn", content=answer)
    assert unauthenticated.status_code == 401
    # bob's attempts changed nothing: alice's generation goes on with the answer bob could not deliver
    response = server.post("alice", f"/he/sessions/{session.session_id}/turn", content=answer)
    assert response.status_code == 200
    result = _finish(server, session, Turn.from_bytes(response.content))
    assert len(result["responses"][0]["sequences"][0]["tokens"]) == 2


def test_garbage_misbound_and_oversized_turns_are_4xx_and_the_generation_survives(
    server: Server, runs: dict[str, Run]
) -> None:
    session, other = runs["peft"].session, runs["tgsp"].session
    turn = _start(server, session.session_id)
    good = session.key_owner.handle(turn.payload)
    path = f"/he/sessions/{session.session_id}/turn"
    wrong_shape = LoraResponse({n: v[:, :-1] for n, v in LoraResponse.from_bytes(good).values.items()}).to_bytes()
    cases = {
        "garbage": (b"garbage", 400, "not a serialised HE-LoRA turn"),
        "empty": (b"", 400, "not a serialised HE-LoRA turn"),
        "old version": (b"TSHE-LORA-TURN\x00\x01" + bytes(40), 400, "frame version 1"),
        "truncated": (Turn(turn.session_id, turn.generation_id, turn.turn, good).to_bytes()[:-9], 400, "truncated"),
        "other session": (Turn(other.session_id, turn.generation_id, 1, good).to_bytes(), 400, "another session"),
        "other generation": (Turn(turn.session_id, "f" * 32, 1, good).to_bytes(), 400, "another generation"),
        "wrong turn": (Turn(turn.session_id, turn.generation_id, 7, good).to_bytes(), 400, "turn 1 is the one"),
        "garbage payload": (Turn(turn.session_id, turn.generation_id, 1, b"junk").to_bytes(), 400, "response"),
        "wrong shapes": (Turn(turn.session_id, turn.generation_id, 1, wrong_shape).to_bytes(), 400, "shapes"),
        "oversized": (Turn(turn.session_id, turn.generation_id, 1, bytes(2_000_000)).to_bytes(), 413, "at most"),
        "over the body limit": (bytes(33 * 1024 * 1024), 413, "exceeds"),
    }
    for label, (body, status, message) in cases.items():
        response = server.post("alice", path, content=body)
        assert response.status_code == status, (label, response.text)
        assert message in response.json()["message"], (label, response.json())
    response = server.post("alice", path, content=Turn(turn.session_id, turn.generation_id, 1, good).to_bytes())
    assert response.status_code == 200
    assert _finish(server, session, Turn.from_bytes(response.content))["responses"]


def test_an_abandoned_generation_is_cancelled_and_its_session_freed(server: Server, runs: dict[str, Run]) -> None:
    session = runs["peft"].session
    sessions = server.app.state.he_sessions
    timeout, sessions.turn_timeout = sessions.turn_timeout, 0.5
    try:
        turn = _start(server, session.session_id)
        deadline = time.monotonic() + 10
        while session.session_id in sessions._live and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.session_id not in sessions._live  # the model and evaluator were freed
        late = Turn(turn.session_id, turn.generation_id, 1, session.key_owner.handle(turn.payload))
        response = server.post("alice", f"/he/sessions/{session.session_id}/turn", content=late.to_bytes())
        assert response.status_code == 400 and response.json()["error"] == "he_no_generation"
    finally:
        sessions.turn_timeout = timeout
    # the session is rebuilt on its next use and generates again
    again = session.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0.0, stop=[]))
    assert len(again[0].sequences[0].tokens) == 3


def test_a_long_prompts_pass_is_split_into_turns_within_the_answer_limit(
    server: Server, runs: dict[str, Run], plaintext: Any
) -> None:
    """Answers over the limit are split by tokens (here 2 tokens of one 128-wide module per turn): the same
    tokens come back, in more turns, each answer within the limit."""
    session = runs["peft"].session
    sessions = server.app.state.he_sessions
    limit, sessions.max_answer_bytes = sessions.max_answer_bytes, 2 * 8 * 128
    before = len(server.bodies)
    try:
        eight = GREEDY.model_copy(update={"max_tokens": 8})
        tokens = session.generate([PROMPT], eight)[0].sequences[0].tokens
    finally:
        sessions.max_answer_bytes = limit
    prompt_tokens = len(torch_backend().encode(PROMPT))
    assert tokens == plaintext.tokens[:8]
    assert session.last.turns == 2 * LAYERS * -(-prompt_tokens // 2) + LAYERS * 7
    answers = [body for body in server.bodies[before:] if body.startswith(b"TSHE-LORA-TURN")]
    assert len(answers) == session.last.turns and max(len(a) for a in answers) < 2 * 8 * 128 + 1024


def test_bad_uploads_and_session_specs_are_refused(server: Server, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from tensafe_tgsp.loader import TGSPPackageLoader

    response = server.post("bob", "/he/adapters", content=b"TSHE-LORA-ADAPTER\x00\x02 not a frame")
    assert response.status_code == 400 and "not an encrypted HE-LoRA adapter" in response.json()["message"]
    response = server.post("bob", "/he/sessions", json={"adapter_id": "a" * 32, "package_artifact_id": "b" * 32})
    assert response.status_code == 422 and "exactly one" in response.json()["message"]
    response = server.post("bob", "/he/sessions", json={"adapter_id": "a" * 32})
    assert response.status_code == 404
    # a package whose adapter is plaintext weights (random ones, not the other tests' adapter) is not served
    # under HE: nothing in it is encrypted for the protocol
    weights = tmp_path / "plain"
    weights.mkdir()
    rng = np.random.default_rng(5)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": rng.normal(0, 1, (4, 128)).astype(np.float32)}
    tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 1, (128, 4)).astype(np.float32)
    save_file(tensors, str(weights / "adapter_model.safetensors"))
    (weights / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    with TenSafeClient(server.url, server.keys["bob"]) as bob:
        recipient = tmp_path / "bob.pub"
        recipient.write_text(bob.tenant_keys().recipient_public_key)
        package = tmp_path / "plain.tgsp"
        TGSPPackageLoader().pack(
            weights,
            package,
            signing_key=server.producer["signing_key"],
            recipients=[recipient],
            base_model="tensafe-embedded-tiny-llama",
        )
        artifact = bob.upload_package(package).artifact_id
    response = server.post("bob", "/he/sessions", json={"package_artifact_id": artifact})
    assert response.status_code == 400 and "not HE-encrypted" in response.json()["message"]


def test_encrypted_adapters_count_against_the_upload_quota(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tensafe.config import HEConfig
    from tensafe.he_lora import KeyOwner
    from tensafe.server.quotas import Quotas
    from tensafe_he_seal.backend import SealCKKSBackend

    rng = np.random.default_rng(1)
    owner = KeyOwner.create(SealCKKSBackend(), HEConfig())
    frame = owner.encrypt_adapter({"m": (rng.normal(0, 0.05, (2, 16)), rng.normal(0, 0.05, (16, 2)), 1.0)})
    service = SessionService(tmp_path / "data", plugin_manager=fresh_plugin_manager(autoload=True))
    with service.db() as db:
        key = create_key(db, service.keyring, "carol")[1]
    app = create_app(service, quotas=Quotas(max_upload_bytes=len(frame) * 3 // 2))
    try:
        with TestClient(app) as http:
            headers = {"Authorization": f"Bearer {key}"}
            first = http.post("/api/v1/he/adapters", content=frame, headers=headers)
            assert first.status_code == 201 and first.json()["key_id"] == owner.key_id
            second = http.post("/api/v1/he/adapters", content=frame, headers=headers)
            assert second.status_code == 413, second.text
    finally:
        service.close()


# -- the CLI, as the key owner ------------------------------------------------------------


def test_cli_inference_he_against_the_server(server: Server, adapter: Path) -> None:
    from tensafe.cli.main import cli

    sampling = RunConfig().sampling.model_copy(update={"max_tokens": 8, "temperature": 0.0})
    local = torch_backend()
    local.load_adapter(adapter)
    expected = local.sample([local.encode(PROMPT)], sampling)[0].sequences[0].text
    pm = fresh_plugin_manager(autoload=True)
    args = ["inference", "--he", "--server", server.url, "--adapter", str(adapter), "-p", PROMPT]
    args += ["--max-tokens", "8", "--temperature", "0"]
    result = CliRunner().invoke(cli, args, obj={"pm": pm}, env={"TENSAFE_API_KEY": server.keys["alice"]})
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + expected + "\n" and expected.strip()

    missing = CliRunner().invoke(cli, args, obj={"pm": pm}, env={"TENSAFE_API_KEY": ""})
    assert missing.exit_code == 2 and "API key" in missing.output and "Traceback" not in missing.output
    plain = CliRunner().invoke(cli, ["inference", "--server", server.url, "-p", PROMPT], obj={"pm": pm})
    assert plain.exit_code == 2 and "add --he" in plain.output
    no_adapter = ["inference", "--he", "--server", server.url, "--api-key", "k", "-p", PROMPT]
    result = CliRunner().invoke(cli, no_adapter, obj={"pm": pm})
    assert result.exit_code == 2 and "--adapter" in result.output


def test_cli_inference_he_with_a_package_and_its_sealed_state(
    server: Server, package: tuple[Path, Path], adapter: Path
) -> None:
    from tensafe.cli.main import cli

    sampling = RunConfig().sampling.model_copy(update={"max_tokens": 4, "temperature": 0.0})
    local = torch_backend()
    local.load_adapter(adapter)
    expected = local.sample([local.encode(PROMPT)], sampling)[0].sequences[0].text
    path, state = package
    pm = fresh_plugin_manager(autoload=True)
    args = ["inference", "--he", "--server", server.url, "--adapter", str(path), "-p", PROMPT, "--max-tokens", "4"]
    args += ["--temperature", "0"]
    env = {"TENSAFE_API_KEY": server.keys["alice"], "TENSAFE_HE_PASSPHRASE": PASSPHRASE}
    result = CliRunner().invoke(cli, [*args, "--key-owner-state", str(state)], obj={"pm": pm}, env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + expected + "\n"
    no_state = CliRunner().invoke(cli, args, obj={"pm": pm}, env=env)
    assert no_state.exit_code == 2 and "key owner's state" in no_state.output
    assert "Traceback" not in no_state.output
    env["TENSAFE_HE_PASSPHRASE"] = ""
    no_passphrase = CliRunner().invoke(cli, [*args, "--key-owner-state", str(state)], obj={"pm": pm}, env=env)
    assert no_passphrase.exit_code == 2 and "TENSAFE_HE_PASSPHRASE" in no_passphrase.output


# -- in process: the engine's evaluator with a mask pool -----------------------------------


def test_in_process_he_generation_takes_masks_from_the_pool(
    adapter: Path, plaintext: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensafe.engine import inference as engine_inference
    from tensafe.he.pool import MaskPool
    from tensafe.orchestrator import TenSafeOrchestrator

    pools: list[MaskPool] = []

    class CountedPool(MaskPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(engine_inference, "MaskPool", CountedPool)
    config = RunConfig(backend="torch", he={"mask_workers": 1})
    orchestrator = TenSafeOrchestrator(config, plugin_manager=fresh_plugin_manager(autoload=True))
    eight = GREEDY.model_copy(update={"max_tokens": 8})
    sequence = orchestrator.generate([PROMPT], adapter=adapter, sampling=eight, he=True)[0].sequences[0]
    assert sequence.tokens == plaintext.tokens[:8]
    assert len(pools) == 1 and pools[0].taken >= 8 * 2 * LAYERS  # every token's masks came from the pool


# -- the key-rotation limit holds across runs -------------------------------------------------


def _decryptions(state: Path) -> int:
    from tensafe.he.key_owner import KeyOwner

    he = fresh_plugin_manager(autoload=True).registry.he_backend("seal-ckks")
    return KeyOwner.load(he, state.read_bytes(), PASSPHRASE).decryptions


def test_the_key_owners_decryption_count_is_kept_in_its_sealed_state(
    client: TenSafeClient, package: tuple[Path, Path]
) -> None:
    path, state = package
    two = GREEDY.model_copy(update={"max_tokens": 2})
    before = _decryptions(state)
    session = client.create_he_inference_session(adapter=path, key_owner_state=state, passphrase=PASSPHRASE)
    session.generate([PROMPT], two)
    over_http = _decryptions(state)
    assert over_http == session.key_owner.decryptions > before
    assert state.stat().st_mode & 0o777 == 0o600
    assert not list(state.parent.glob(f".{state.name}.*"))  # no partial file left beside it

"""Bad requests get a 4xx with a stable error code and a message; never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tensafe.server.app import create_app
from tests.server.conftest import Api
from tests.server.test_api import T, create_session
from tests.serving import batch, session_config


def check(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code and body["message"]
    return body


def test_malformed_json_is_400(api: Api) -> None:
    session_id = create_session(api)
    h = {**api.headers("alice"), "Content-Type": "application/json"}
    for raw in (b"{not json", b"", b"[1, 2", b'{"data": [}'):
        check(
            api.http.post(f"{T}/{session_id}/forward_backward", content=raw, headers=h),
            400 if raw else 422,
            "malformed_json" if raw else "invalid_request",
        )


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("forward_backward", {"data": "x"}, "body.data"),
        ("forward_backward", {"data": []}, "body.data"),
        (
            "forward_backward",
            {"data": [{"model_input": [1, 2], "loss_fn_inputs": {"target_tokens": [1]}}]},
            "body.data.0",
        ),
        ("forward_backward", {"data": [], "extra": 1}, "body.extra"),
        (
            "forward_backward",
            {"data": [{"model_input": [1], "loss_fn_inputs": {"target_tokens": [2]}}], "loss_fn": "x"},
            "body.loss_fn",
        ),
        ("optim_step", {"adam_params": {"learning_rate": -1}}, "body.adam_params.learning_rate"),
        ("optim_step", {"adam_params": {"beta1": "high"}}, "body.adam_params.beta1"),
        ("sample", {"prompts": ["a"], "num_samples": 1000}, "body.num_samples"),
        ("sample", {"prompts": ["a"], "sampling_params": {"top_p": 2}}, "body.sampling_params.top_p"),
        ("sample", {"prompts": ["a"], "sampling_params": {"top_k": 0}}, "body.sampling_params.top_k"),
        ("sample", {"prompts": []}, "body.prompts"),
        ("sample", {"prompts": ["a"], "sampling_params": {"temperature": 1e-300}}, "body.sampling_params.temperature"),
        ("sample", {"prompts": ["a"], "sampling_params": {"top_p": 1e-300}}, "body.sampling_params.top_p"),
        ("sample", {"prompts": ["a"], "sampling_params": {"seed": 2**64}}, "body.sampling_params.seed"),
        ("sample", {"prompts": ["a"], "sampling_params": {"stop": [2**64]}}, "body.sampling_params.stop"),
        ("optim_step", {"adam_params": {"learning_rate": 10}}, "body.adam_params.learning_rate"),
        (
            "forward_backward",
            {"data": [{"model_input": [2**64], "loss_fn_inputs": {"target_tokens": [1]}}]},
            "body.data.0",
        ),
        ("load_state", {"state_id": ""}, "body.state_id"),
    ],
)
def test_wrong_types_and_out_of_range_values_are_422_naming_the_field(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    session_id = create_session(api)
    data = check(
        api.http.post(f"{T}/{session_id}/{path}", json=body, headers=api.headers("alice")), 422, "invalid_request"
    )
    assert any(p["field"].startswith(field) for p in data["problems"]), data["problems"]


def test_invalid_session_configs_are_refused_with_a_reason(api: Api) -> None:
    h = api.headers("alice")
    config = session_config()
    check(api.http.post(T, json={"config": config, "sampling_rate": 0}, headers=h), 422, "invalid_request")
    check(api.http.post(T, json={"config": config, "sampling_rate": 1.5}, headers=h), 422, "invalid_request")
    body = check(api.http.post(T, json={"config": config}, headers=h), 400, "invalid_request")
    assert "sampling_rate" in body["message"]
    unknown = {**config, "backend": "no-such-backend"}
    check(
        api.http.post(T, json={"config": unknown, "sampling_rate": 0.1, "dataset_size": 50}, headers=h),
        400,
        "not_installed",
    )
    typo = {**config, "dp": {**config["dp"], "epsilonn": 1}}
    check(api.http.post(T, json={"config": typo, "sampling_rate": 0.1}, headers=h), 422, "invalid_request")
    no_delta = check(api.http.post(T, json={"config": config, "sampling_rate": 0.1}, headers=h), 400, "invalid_request")
    assert "delta" in no_delta["message"]


def test_unknown_ids_and_paths_are_404(api: Api) -> None:
    h = api.headers("alice")
    check(api.http.get(f"{T}/nope", headers=h), 404, "not_found")
    check(api.http.post(f"{T}/nope/optim_step", json={}, headers=h), 404, "not_found")
    check(api.http.get("/api/v1/futures/nope", headers=h), 404, "not_found")
    check(api.http.get("/api/v1/packages/nope", headers=h), 404, "not_found")
    check(api.http.post("/api/v1/inference/nope/generate", json={"prompts": ["a"]}, headers=h), 404, "not_found")
    check(api.http.get("/api/v1/no-such-route", headers=h), 404, "not_found")
    session_id = create_session(api)
    check(api.http.post(f"{T}/{session_id}/load_state", json={"state_id": "nope"}, headers=h), 404, "not_found")
    check(api.http.post("/api/v1/inference", json={"adapter_artifact_id": "nope"}, headers=h), 404, "not_found")


def test_an_operation_the_backend_cannot_do_fails_its_future_with_a_code(api: Api) -> None:
    session_id = create_session(api, enabled=False)  # without DP an empty step has nothing to apply
    h = api.headers("alice")
    opt = api.http.post(f"{T}/{session_id}/optim_step", json={}, headers=h).json()
    done = api.http.get(f"/api/v1/futures/{opt['future_id']}?wait=20", headers=h).json()
    assert done["status"] == "failed" and done["error"]["error"] == "invalid_request"
    assert "forward_backward first" in done["error"]["message"]
    wrong = [d.model_dump() for d in batch(1)]
    wrong[0]["model_input"][0] = 10**6  # not a token of the model
    fb = api.http.post(f"{T}/{session_id}/forward_backward", json={"data": wrong}, headers=h).json()
    done = api.http.get(f"/api/v1/futures/{fb['future_id']}?wait=20", headers=h).json()
    assert done["status"] == "failed" and done["error"]["error"] == "backend_error"
    check(api.http.get(f"/api/v1/futures/{fb['future_id']}?wait=-1", headers=h), 422, "invalid_request")


def test_an_oversized_body_is_413(api: Api) -> None:
    small = TestClient(create_app(api.service, max_body_bytes=2000))
    session_id = create_session(api)
    h = api.headers("alice")
    data = [d.model_dump() for d in batch(1, size=40)]
    check(small.post(f"{T}/{session_id}/forward_backward", json={"data": data}, headers=h), 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000

    check(
        small.post(f"{T}/{session_id}/optim_step", content=chunks(), headers={**h, "Content-Type": "application/json"}),
        413,
        "payload_too_large",
    )


def post_raw(api: Api, path: str, raw: str) -> Any:
    """POST a body as written: JSON escapes of lone surrogates and the non-standard Infinity / NaN are kept."""
    h = {**api.headers("alice"), "Content-Type": "application/json"}
    return api.http.post(path, content=raw.encode(), headers=h)


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("sample", '{"prompts": ["\\ud800"]}', "body.prompts.0"),
        ("sample", '{"prompts": ["ok \\udfff"]}', "body.prompts.0"),
        ("sample", '{"prompts": ["a"], "sampling_params": {"temperature": Infinity}}', "body.sampling_params"),
        ("sample", '{"prompts": ["a"], "sampling_params": {"stop": "\\ud800"}}', "body.sampling_params.stop"),
        ("optim_step", '{"adam_params": {"learning_rate": Infinity}}', "body.adam_params.learning_rate"),
        ("optim_step", '{"adam_params": {"learning_rate": 1e999}}', "body.adam_params.learning_rate"),
        ("optim_step", '{"adam_params": {"grad_clip_norm": NaN}}', "body.adam_params.grad_clip_norm"),
        (
            "forward_backward",
            '{"data": [{"model_input": [1], "loss_fn_inputs": {"target_tokens": [2]}}],'
            ' "loss_fn": "ppo", "loss_fn_config": {"clip_low": -Infinity}}',
            "body.loss_fn_config",
        ),
        ("save_state", '{"name": "\\ud800"}', "body.name"),
    ],
)
def test_infinities_and_lone_surrogates_are_422_naming_the_field(api: Api, path: str, raw: str, field: str) -> None:
    session_id = create_session(api)
    data = check(post_raw(api, f"{T}/{session_id}/{path}", raw), 422, "invalid_request")
    assert any(p["field"].startswith(field) for p in data["problems"]), data["problems"]


def test_a_valid_prompt_outside_the_basic_plane_is_still_sampled(api: Api) -> None:
    session_id = create_session(api)
    response = post_raw(api, f"{T}/{session_id}/sample", '{"prompts": ["\\ud83d\\ude00 ok"]}')
    assert response.status_code == 200, response.text


def test_an_audit_position_past_64_bits_is_422(api: Api) -> None:
    h = api.headers("alice")
    data = check(api.http.get(f"/api/v1/audit?after={2**70}", headers=h), 422, "invalid_request")
    assert [p["field"] for p in data["problems"]] == ["query.after"]
    assert api.http.get(f"/api/v1/audit?after={2**63 - 1}", headers=h).status_code == 200


@pytest.mark.parametrize(
    ("section", "raw_value", "field"),
    [
        ("model", '{"device": "tpu:%n%s"}', "body.config.model.device"),
        ("optimizer", '{"learning_rate": Infinity}', "body.config.optimizer.learning_rate"),
        ("dp", '{"max_grad_norm": Infinity}', "body.config.dp.max_grad_norm"),
        ("dp", '{"noise_multiplier": NaN}', "body.config.dp.noise_multiplier"),
        ("sampling", '{"temperature": 1e-300}', "body.config.sampling.temperature"),
        ("training", '{"seed": 36893488147419103232}', "body.config.training.seed"),
    ],
)
def test_a_session_config_with_a_bad_number_or_device_is_422(
    api: Api, section: str, raw_value: str, field: str
) -> None:
    config = session_config()
    config.pop(section)
    body = json.dumps({"config": config, "sampling_rate": 0.1, "dataset_size": 50})
    raw = body.replace('"config": {', f'"config": {{"{section}": {raw_value}, ', 1)
    data = check(post_raw(api, T, raw), 422, "invalid_request")
    assert [p["field"] for p in data["problems"]] == [field], data["problems"]


def test_unknown_lora_target_modules_are_400_listing_the_available_ones(api: Api) -> None:
    config = session_config()
    config.update(backend="torch", lora={"rank": 2, "target_modules": ["nope"]}, model={"name": None})
    body = check(
        api.http.post(
            T, json={"config": config, "sampling_rate": 0.1, "dataset_size": 50}, headers=api.headers("alice")
        ),
        400,
        "invalid_request",
    )
    assert "nope" in body["message"] and "q_proj" in body["message"]

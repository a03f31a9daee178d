"""export_tgsp and inference from the package: in-process and through a live server alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensafe.config import RunConfig, TGSPConfig
from tensafe.engine.ledger import CALLER_DUTIES, PRIVACY_UNIT_SESSION
from tensafe.sdk import NotFound, TenSafeClient
from tensafe.testing import fresh_plugin_manager
from tensafe.types import SamplingParams
from tensafe_tgsp import format as tgsp_format
from tensafe_tgsp.keys import keygen
from tests.serving import LiveServer, batch, bigram_config, create_key

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def packaging_config(keys: dict[str, Path]) -> RunConfig:
    tgsp = TGSPConfig(
        signing_key=keys["signing_key"],
        recipients=[keys["recipient_public_key"]],
        recipient_key=keys["recipient_key"],
        trusted_signers=[keys["signing_public_key"]],
    )
    return bigram_config().model_copy(update={"tgsp": tgsp})


@pytest.mark.parametrize("door", ["local", "remote"])
def test_an_exported_package_serves_the_trained_adapter(door: str, live_server: LiveServer, tmp_path: Path) -> None:
    keys = keygen(tmp_path / "keys", "producer")
    if door == "local":
        client = TenSafeClient(plugin_manager=fresh_plugin_manager(autoload=True))
        config = packaging_config(keys)
        recipients: list[Path] = []
    else:
        client = TenSafeClient(live_server.url, create_key(live_server.data_dir, live_server.database, "alice"))
        config = bigram_config()  # the server signs with alice's key and encrypts to it, plus ours
        recipients = [keys["recipient_public_key"]]
    with client:
        session = client.create_training_session(config, sampling_rate=0.01, dataset_size=400)
        for n in (1, 2):
            session.forward_backward(batch(n))
            session.optim_step().result(60)
        trained = session.sample(["record 1"], GREEDY)[0].sequences[0].text
        base = client.create_inference_session(config).generate(["record 1"], GREEDY)[0].sequences[0].text
        assert trained != base
        exported = session.export_tgsp(tmp_path / "adapter.tgsp", recipients)
        manifest = tgsp_format.inspect(tmp_path / "adapter.tgsp")
        assert exported.package_id == manifest.get("package_id") and exported.step == 2
        certificate = manifest["privacy_certificate"]
        assert "declared by the caller" in certificate["sampling"] and certificate["steps"] == 2
        assert (certificate["mode"], certificate["privacy_unit"]) == ("session", PRIVACY_UNIT_SESSION)
        assert set(CALLER_DUTIES) == set(certificate["caller_duties"]) and certificate["max_grad_norm"] == 1.0
        served = client.create_inference_session(config, adapter=exported)
        assert served.generate(["record 1"], GREEDY)[0].sequences[0].text == trained
        if door == "remote":
            with pytest.raises(NotFound):
                client.create_inference_session(config, adapter="no-such-package")
            # Downloaded, the package opens here with our own key, signed by alice's server-held key.
            signer = tmp_path / "alice-signing.pub"
            signer.write_text(client.tenant_keys().signing_public_key)
            tgsp_format.unpack(
                tmp_path / "adapter.tgsp",
                recipient_key=keys["recipient_key"],
                trusted_signers=[signer],
                destination=tmp_path / "opened",
            )
            assert (tmp_path / "opened").is_dir()

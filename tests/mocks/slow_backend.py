"""A bigram backend whose forward_backward on a batch of exactly three data takes a long time.

Installed as a throw-away distribution (see :mod:`tests.mocks.distributions`),
it lets a test kill the server while an operation is running.
"""

from __future__ import annotations

SLOW_BATCH = 3
SLOW_SECONDS = 60

PLUGIN_MODULE = """
from tensafe import hookimpl


@hookimpl
def tensafe_register_ml_backends(register):
    def factory():
        import time

        from tensafe_bigram.backend import BigramBackend

        class SlowBigram(BigramBackend):
            def forward_backward(self, data, loss_fn, loss_fn_config=None):
                if len(data) == SLOW_BATCH:
                    time.sleep(SLOW_SECONDS)
                return super().forward_backward(data, loss_fn, loss_fn_config)

        return SlowBigram()

    register("slow-bigram", factory)
""".replace("SLOW_BATCH", str(SLOW_BATCH)).replace("SLOW_SECONDS", str(SLOW_SECONDS))

"""HE-LoRA cost for one LoRA product (d=4096, r=16, N=8192) against TenSEAL baselines in the same run.

TenSafe's protocol (tensafe.he_lora over seal-ckks) computes the whole delta
``(alpha/r) B A x`` with an encrypted adapter: r plaintext-ciphertext products
for A x, r for B t, no rotation. Reported per token and module: the evaluator's
time (offline part: masks and ``e``, which do not depend on x; online part:
encode x, products, serialise), the key owner's time (deserialise, decrypt,
plaintext sums and B w), rotations, bytes of the adapter, the keys and each
message, and the maximum error against float64 plaintext LoRA.

Baselines (TenSEAL installed in the bench environment only; skipped with a note
when it is missing), both computing only ``A x`` with x encrypted and A plain,
N=8192, primes 60/40/60, scale 2^40: ``CKKSVector.matmul`` (diagonal method,
about d rotations) and 16 ``dot`` products (a product and log2(d) rotations each).
Goal: <= 30 ms per token and module, >= 10x faster than the dot baseline, error <= 1e-3 relative.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tensafe.config import HEConfig
from tensafe.he_lora import InProcessTransport, LoraRequest, LoraResponse, in_process
from tensafe_he_seal.backend import SealCKKSBackend

D, R, N = 4096, 16, 8192
TOKENS = 8


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def tensafe_run(a: np.ndarray, b: np.ndarray, scaling: float, xs: np.ndarray) -> dict[str, Any]:
    config = HEConfig(poly_modulus_degree=N, coeff_mod_bit_sizes=[60, 60, 60])
    owner, evaluator = in_process(SealCKKSBackend, config, {"m": (a, b, scaling)})
    assert isinstance(evaluator._transport, InProcessTransport)
    adapter = owner.encrypt_adapter({"m": (a, b, scaling)})
    offline, online, keyowner, errors, relative = [], [], [], [], []
    request_bytes = response_bytes = 0
    for x in xs:
        t_off, _ = timed(lambda: evaluator.prepare("m", 1))
        t_on, (request, unmask) = timed(lambda x=x: evaluator.request("m", x[None, :]))
        wire = request.to_bytes()
        t_owner, answer = timed(lambda wire=wire: owner.handle(wire))
        delta = scaling * (LoraResponse.from_bytes(answer).values[0] + unmask[0])
        expected = scaling * (b @ (a @ x))
        offline.append(t_off)
        online.append(t_on)
        keyowner.append(t_owner)
        errors.append(float(np.max(np.abs(delta - expected))))
        relative.append(errors[-1] / float(np.max(np.abs(expected))))
        request_bytes, response_bytes = len(wire), len(answer)
    assert LoraRequest.from_bytes(wire).tokens == 1
    return {
        "offline": statistics.median(offline),
        "online": statistics.median(online),
        "key_owner": statistics.median(keyowner),
        "rotations": evaluator.stats["rotations"],
        "products_per_token": evaluator.stats["plain_products"] // len(xs),
        "adapter_bytes": len(adapter),
        "public_key_bytes": len(owner.backend.serialize_key("public")),
        "evaluation_key_bytes": 0,
        "request_bytes": request_bytes,
        "response_bytes": response_bytes,
        "max_abs_error": max(errors),
        "max_rel_error": max(relative),
        "has_galois": evaluator.backend.has_key("galois"),
    }


def tenseal_run(a: np.ndarray, x: np.ndarray) -> dict[str, Any] | None:
    try:
        import tenseal as ts
    except ImportError:
        print("  (TenSEAL is not importable: baselines skipped; pip install tenseal in the bench environment)")
        return None
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=N, coeff_mod_bit_sizes=[60, 40, 60])
    context.global_scale = 2**40
    t_keys, _ = timed(context.generate_galois_keys)
    galois_bytes = len(context.serialize(save_public_key=False, save_secret_key=False, save_relin_keys=False))
    enc = ts.ckks_vector(context, x.tolist())
    expected = a @ x
    dots = []
    for _ in range(3):
        t_dot, result = timed(lambda: [enc.dot(row.tolist()) for row in a])
        dots.append(t_dot)
    dot_error = max(abs(r.decrypt()[0] - e) for r, e in zip(result, expected, strict=True))
    t_matmul, product = timed(lambda: enc.matmul(a.T.tolist()))
    matmul_error = float(np.max(np.abs(np.array(product.decrypt()) - expected)))
    return {
        "galois_keygen": t_keys,
        "galois_bytes": galois_bytes,
        "dot": statistics.median(dots),
        "dot_error": dot_error,
        "matmul": t_matmul,
        "matmul_error": matmul_error,
        "ciphertext_bytes": len(enc.serialize()),
    }


def main() -> int:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.02, (R, D))
    b = rng.normal(0, 0.02, (D, R))
    xs = rng.normal(0, 1, (TOKENS, D))
    print(f"HE-LoRA, d={D}, r={R}, N={N} (one LoRA product per token and module; medians of {TOKENS} tokens)")
    ours = tensafe_run(a, b, 2.0, xs)
    evaluator = ours["offline"] + ours["online"]
    print(f"  tensafe evaluator online      {ours['online'] * 1e3:8.1f} ms   (encode x, {R} products, masks, bytes)")
    print(f"  tensafe evaluator offline     {ours['offline'] * 1e3:8.1f} ms   (masks and e; independent of x)")
    print(f"  tensafe key owner             {ours['key_owner'] * 1e3:8.1f} ms   (deserialise, decrypt, sums, B w)")
    print(f"  plaintext-ciphertext products {ours['products_per_token']:8d}      rotations {ours['rotations']}")
    print(f"  Galois / relinearisation keys: none (galois present: {ours['has_galois']})")
    print(f"  encrypted adapter             {ours['adapter_bytes'] / 2**20:8.2f} MiB (A and B, at 2 of 2 data primes)")
    print(f"  public key                    {ours['public_key_bytes'] / 2**20:8.2f} MiB")
    print(
        f"  request per token             {ours['request_bytes'] / 2**20:8.2f} MiB"
        f"   response {ours['response_bytes']} B"
    )
    print(f"  max error                     {ours['max_abs_error']:.2e} abs, {ours['max_rel_error']:.2e} relative")
    base = tenseal_run(a, xs[0])
    if base is not None:
        print(
            f"  TenSEAL Galois keygen         {base['galois_keygen']:8.2f} s"
            f"    ({base['galois_bytes'] / 2**20:.1f} MiB)"
        )
        print(f"  TenSEAL 16 x dot (A x only)   {base['dot'] * 1e3:8.1f} ms   error {base['dot_error']:.2e}")
        print(f"  TenSEAL matmul (A x only)     {base['matmul']:8.2f} s    error {base['matmul_error']:.2e}")
        print(f"  ratio dot / tensafe online            {base['dot'] / ours['online']:6.1f}x")
        print(f"  ratio dot / tensafe evaluator total   {base['dot'] / evaluator:6.1f}x")
        print(f"  ratio dot / tensafe eval + key owner  {base['dot'] / (evaluator + ours['key_owner']):6.1f}x")
        print(f"  ratio matmul / tensafe online         {base['matmul'] / ours['online']:6.0f}x")
    goal = ours["online"] <= 0.030 and ours["max_rel_error"] <= 1e-3
    print(f"  goal (online <= 30 ms, relative error <= 1e-3): {'met' if goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checks that FBGEMM's table-batched embedding kernels load and run on this host.

Run as ``python -m lhf_torchrec.install_check``. On a CPU-only machine the usual failure is that
``pip install torchrec`` put the CUDA ``fbgemm-gpu`` over ``fbgemm-gpu-cpu``; its import then dies
on ``libnvidia-ml.so.1``. This check makes that failure loud at install time instead of at the
first sharded lookup.
"""

import sys

import torch


def check_fbgemm_tbe(device: torch.device = torch.device("cpu")) -> float:
    """Runs one lookup through torchrec's FBGEMM-backed ``FusedEmbeddingBagCollection``.

    Returns the largest difference from a plain ``torch.nn.EmbeddingBag`` with the same weights.
    Raises ``ImportError`` naming the installed build when ``fbgemm_gpu`` cannot load.
    """
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception as e:  # the CUDA build raises OSError/ImportError without a driver
        from importlib.metadata import PackageNotFoundError, version

        builds = []
        for dist in ("fbgemm-gpu", "fbgemm-gpu-cpu"):
            try:
                builds.append(f"{dist}=={version(dist)}")
            except PackageNotFoundError:
                pass
        raise ImportError(
            f"fbgemm_gpu cannot load ({type(e).__name__}: {e}); installed: {builds or 'none'}. "
            "On a CPU-only host install fbgemm-gpu-cpu==1.9.0 and remove fbgemm-gpu "
            "(pip install --no-deps -r requirements/cpu.lock)."
        ) from e

    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    tables = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=16, feature_names=["f0"])]
    fused = FusedEmbeddingBagCollection(
        tables=tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}, device=device
    )
    weight = fused.state_dict()["embedding_bags.t0.weight"].detach().clone()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0"], values=torch.tensor([1, 5, 7, 15], device=device), lengths=torch.tensor([2, 0, 2], device=device)
    )
    out = fused(kjt)["f0"]
    reference = torch.nn.functional.embedding_bag(
        torch.tensor([1, 5, 7, 15], device=device), weight, torch.tensor([0, 2, 2], device=device), mode="sum"
    )
    return (out - reference).abs().max().item()


def main() -> int:
    diff = check_fbgemm_tbe()
    if diff > 1e-5:
        print(f"FBGEMM TBE lookup differs from the reference by {diff:.3g}", file=sys.stderr)
        return 1
    import fbgemm_gpu

    print(f"fbgemm_gpu {fbgemm_gpu.__version__}: table-batched lookup on CPU matches the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
